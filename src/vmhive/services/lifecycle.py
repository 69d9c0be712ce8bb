"""Power operations: start, stop, force-stop, reboot, reset, pause, resume.

Each public method checks what it can at once (so the API answers 4xx
without creating a job) and submits a job that checks again under the VM's
job lock, since the state may have moved while the job waited its turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from vmhive.hypervisor.base import DriverError, ObservedState
from vmhive.jobs.runner import JobContext, JobError
from vmhive.services import cloudinit, specs
from vmhive.services.context import NotOwned, ServiceContext
from vmhive.services.errors import Conflict

if TYPE_CHECKING:
    from vmhive.services.networks import NetworkService
from vmhive.store.models import Disk, Nic, Vm

STARTABLE = ("stopped", "crashed")


class Lifecycle:
    def __init__(self, ctx: ServiceContext, networks: NetworkService | None = None) -> None:
        self.ctx = ctx
        self.networks = networks

    async def _submit(
        self,
        name: str,
        kind: str,
        check: Callable[[Vm], None],
        body: Callable[[JobContext, Vm], Awaitable[None]],
        **params: Any,
    ) -> str:
        vm = await self.ctx.load_vm(name)
        vm_uuid = vm.uuid
        target = f"vm:{vm_uuid}"
        busy = self.ctx.runner.busy(target)
        try:
            check(vm)
        except Conflict:
            # While another job on the VM runs (a reboot has it off for a moment),
            # what we read is passing: the queued job checks again at its turn.
            if not busy:
                raise
        # A job that will not wait for the VM's lock can use what we just read;
        # one that queues behind another must read the VM again when its turn comes.
        fresh = None if busy else vm

        async def job(ctx: JobContext) -> dict[str, Any]:
            current = fresh or await self.ctx.load_vm_by_uuid(vm_uuid)
            if current is None:
                raise JobError(f"VM {name} no longer exists")
            try:
                check(current)
            except Conflict as exc:
                raise JobError(str(exc)) from None
            await body(ctx, current)
            return {"vm": name}

        return await self.ctx.runner.submit(
            kind, f"vm:{vm_uuid}", job, params={"name": name, **params}
        )

    # -- checks -------------------------------------------------------------------

    def _must_be_stopped(self, vm: Vm) -> None:
        if vm.is_template:
            raise Conflict(f"VM {vm.name} is a template: clone it to run it")
        if vm.state == "creating":
            raise Conflict(f"VM {vm.name} is still being created")
        if vm.state not in STARTABLE or self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {vm.name} is already {vm.state}")

    def _must_be_running(self, vm: Vm) -> None:
        if not self.ctx.driver.is_running(vm.uuid):
            raise Conflict(f"VM {vm.name} is not running (it is {vm.state})")

    def _must_be_active(self, vm: Vm) -> None:
        self._must_be_running(vm)

    # -- start ----------------------------------------------------------------------

    async def start(self, name: str) -> str:
        async def body(ctx: JobContext, vm: Vm) -> None:
            await self.do_start(ctx, vm.uuid, vm)

        return await self._submit(name, "vm.start", self._must_be_stopped, body)

    async def _renumber_devices(self, vm_uuid: str) -> Vm:
        """QEMU names disks and NICs by position (disk0, net0, ...) at start; after a
        removal from the middle, the records follow so hot-plug and resize find them."""
        async with self.ctx.sessions() as session:
            for model in (Disk, Nic):
                rows = list(
                    await session.scalars(
                        select(model).join(Vm).where(Vm.uuid == vm_uuid).order_by(model.index)
                    )
                )
                for position, row in enumerate(rows):
                    if row.index != position:  # ascending: the slot below is always free
                        row.index = position
                        await session.flush()
            await session.commit()
        vm = await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None:
            raise JobError("the VM no longer exists")
        return vm

    async def do_start(
        self, ctx: JobContext, vm_uuid: str, vm: Vm | None = None, *, snapshot: str | None = None
    ) -> None:
        """Start QEMU for the VM; with `snapshot` (an internal snapshot with RAM), the
        guest resumes where that snapshot left it instead of booting."""
        vm = vm or await self.ctx.load_vm_by_uuid(vm_uuid)
        if vm is None:
            raise JobError("the VM no longer exists")
        try:
            await self.ctx.claim(vm)
        except NotOwned as exc:
            raise JobError(str(exc)) from None
        if vm.generation == 2 and vm.state != "creating":
            vars_file = specs.vm_dir(self.ctx.settings, vm) / specs.VARS_FILE
            if not vars_file.exists():
                raise JobError(f"the VM's UEFI variables file {vars_file} is missing")
        if vm.cloudinit:
            await cloudinit.write_seed(self.ctx.settings, vm)
        if [d.index for d in vm.disks] != list(range(len(vm.disks))) or [
            n.index for n in vm.nics
        ] != list(range(len(vm.nics))):
            vm = await self._renumber_devices(vm_uuid)
        accel = self.ctx.host.accel.accel
        spec = specs.build_spec(self.ctx.settings, vm, accel)
        previous, previous_reason = vm.state, vm.state_reason
        # Recorded while QEMU launches: the write overlaps QEMU's own start-up.
        starting = asyncio.create_task(
            self.ctx.record_state(vm_uuid, "starting", "", desired="running")
        )

        async def undo() -> None:
            await self.ctx.driver.kill(vm_uuid)
            await self.ctx.record_state(
                vm_uuid, previous, previous_reason, desired="stopped", pid=None
            )

        ctx.on_rollback("put the VM back as it was", undo)
        if self.networks is not None and any(n.backend == "tap" for n in vm.nics):
            networks = self.networks
            ctx.on_rollback("remove the VM's TAPs", lambda: networks.unplug(vm_uuid))
            await ctx.log("connecting the NICs to their networks")
            await networks.plug(vm)
        await ctx.log(
            f"starting QEMU ({spec.machine}, {accel}, {vm.vcpus} vCPU, {vm.memory_mib} MiB)"
        )
        try:
            pid = await self.ctx.driver.start(spec, snapshot=snapshot)
        except DriverError as exc:
            raise JobError(str(exc)) from exc
        finally:
            await starting
        await self.ctx.record_state(vm_uuid, ObservedState.RUNNING, "", pid=pid, accel=accel)
        await ctx.log(f"QEMU runs as PID {pid}")
        ctx.commit()

    # -- stop ---------------------------------------------------------------------------

    async def stop(self, name: str, timeout: float | None = None) -> str:
        grace = self.ctx.settings.stop_timeout if timeout is None else timeout

        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.record_state(
                vm_uuid, "stopping", "ACPI power-off requested", desired="stopped"
            )
            await ctx.log(f"pressing the ACPI power button; forcing off after {grace:.0f} s")
            try:
                await self.ctx.driver.powerdown(vm_uuid)
            except DriverError as exc:
                await ctx.log(f"power button failed ({exc}); forcing off")
            if await self.ctx.driver.wait_stopped(vm_uuid, grace):
                await ctx.log("the guest powered off")
                return
            await ctx.log("the guest did not power off in time; forcing off")
            await self.ctx.driver.kill(vm_uuid)

        return await self._submit(name, "vm.stop", self._must_be_active, body, timeout=grace)

    async def force_stop(self, name: str) -> str:
        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.record_state(vm_uuid, "stopping", "forced off", desired="stopped")
            await self.ctx.driver.kill(vm_uuid)
            await ctx.log("forced off")

        return await self._submit(name, "vm.force-stop", self._must_be_active, body)

    async def reboot(self, name: str, timeout: float | None = None) -> str:
        """A clean power cycle: ACPI power-off (forced after the timeout), then start."""
        grace = self.ctx.settings.stop_timeout if timeout is None else timeout

        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.driver.powerdown(vm_uuid)
            if not await self.ctx.driver.wait_stopped(vm_uuid, grace):
                await ctx.log("the guest did not power off in time; forcing off")
                await self.ctx.driver.kill(vm_uuid)
            await ctx.progress(50)
            await self.do_start(ctx, vm_uuid)

        return await self._submit(name, "vm.reboot", self._must_be_active, body, timeout=grace)

    async def reset(self, name: str) -> str:
        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.driver.reset(vm_uuid)
            await ctx.log("hard reset")

        return await self._submit(name, "vm.reset", self._must_be_active, body)

    async def pause(self, name: str) -> str:
        def check(vm: Vm) -> None:
            self._must_be_running(vm)
            if vm.state == "paused":
                raise Conflict(f"VM {vm.name} is already paused")

        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.driver.pause(vm_uuid)
            await self.ctx.record_state(vm_uuid, "paused", "paused by the user")

        return await self._submit(name, "vm.pause", check, body)

    async def resume(self, name: str) -> str:
        def check(vm: Vm) -> None:
            self._must_be_running(vm)
            if vm.state != "paused":
                raise Conflict(f"VM {vm.name} is not paused (it is {vm.state})")

        async def body(ctx: JobContext, vm: Vm) -> None:
            vm_uuid = vm.uuid
            await self.ctx.driver.resume(vm_uuid)
            await self.ctx.record_state(vm_uuid, "running", "")

        return await self._submit(name, "vm.resume", check, body)
