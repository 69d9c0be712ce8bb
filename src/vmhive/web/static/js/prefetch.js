// A classic script that runs before the app's modules have loaded: when the page
// opened is the VM list, its data is asked for at once (pages/vms.js takes it).
if (location.hash === "#/vms") {
  window.vmhivePrefetch = {
    "/api/vms": fetch("/api/vms", { headers: { Accept: "application/json" } })
      .then((response) => (response.ok ? response.json() : null))
      .catch(() => null),
  };
}
