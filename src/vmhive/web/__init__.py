"""The browser front end: static files served by `vmhive.api.routes_ui`.

`static/vendor/` is filled by `scripts/build-ui.sh` from the pinned npm packages
in `web/package-lock.json`; everything else here is the app's own code.
"""
