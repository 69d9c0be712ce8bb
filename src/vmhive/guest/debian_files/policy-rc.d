#!/bin/sh
# vmhive image build only (removed from the image): start no services in the
# build chroot.
exit 101
