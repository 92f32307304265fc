"""Session containers in Incus: find them, create them (stopped, the NIC pinned to a
free address), start them once their mounts are checked, and remove them."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from coi import naming
from coi.config import Mount
from coi.errors import CoiError, ImageNotFoundError, NotFoundError, OperationFailedError, TimedOutError
from coi.sessions.signals import deferred_signals, signals_ignored
from coi.sessions.spec import (KEY, STORAGE, ContainerInfo, Session, SessionRequest, check_mount_sources,
                               choose_slot, container_spec, is_coi, is_launched, is_stopped, launched_config,
                               new_session_id, sized_root, to_info)
from coi.wait import wait_for

if TYPE_CHECKING:
    from coi.incus import IncusClient
    from coi.messages import Log

def list_containers(client: IncusClient, prefix: str, *, with_state: bool = True) -> list[ContainerInfo]:
    instances = client.instances(recursion=2 if with_state else 1)
    return sorted((to_info(i) for i in instances if is_coi(i, prefix)), key=lambda c: c.name)


def coi_container(client: IncusClient, name: str, prefix: str) -> dict[str, Any]:
    """The named instance, refused when it is not one of coi's."""
    try:
        inst = client.instance(name)
    except NotFoundError:
        raise NotFoundError(f"container {name} not found", "see 'coi list'") from None
    if not (is_coi(inst, prefix) or is_launched(inst)):
        raise CoiError(f"{name} is not a coi container", "coi only acts on containers it created")
    return inst


@contextmanager
def workspace_lock(lock_dir: Path, workspace: Path) -> Iterator[None]:
    """Host-side lock per workspace: slot choice and creation happen under it."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{naming.workspace_hash(str(workspace))}.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _workspace_containers(instances: list[dict[str, Any]], req: SessionRequest) -> dict[int, dict[str, Any]]:
    base = naming.container_name(str(req.workspace), 0, prefix=req.prefix)[:-1]
    out = {}
    for inst in instances:
        slot = naming.slot_of(inst["name"])
        if inst["name"].startswith(base) and slot is not None and inst["name"] == base + str(slot):
            out[slot] = inst
    return out


def _reusable(inst: Mapping[str, Any] | None, req: SessionRequest) -> bool:
    """A persistent container of the slot, on the same branch copy (or none) as asked."""
    cfg = (inst or {}).get("config") or {}
    wanted = req.branch.name if req.branch is not None else ""
    return bool(inst) and cfg.get(f"{KEY}persistent") == "true" and cfg.get(f"{KEY}branch", "") == wanted


def open_session(client: IncusClient, req: SessionRequest, log: Log) -> Session:
    """Pick the slot and create (or reuse) the container, under the workspace lock.

    The container is created stopped, with its NIC pinned to a free address
    (``coi.network.pin_nic``); anything created here is removed again if
    set-up is interrupted.
    """
    from coi import network
    from coi.sessions import forwards

    with workspace_lock(req.lock_dir, req.workspace), network.address_lock(req.lock_dir):
        instances = client.instances(recursion=1)
        existing = _workspace_containers(instances, req)
        if req.persistent:
            if req.slot > 0:
                candidates = [req.slot] if _reusable(existing.get(req.slot), req) else []
            else:
                candidates = sorted(s for s, inst in existing.items() if _reusable(inst, req))
            if candidates:
                slot = candidates[0]
                inst = existing[slot]
                ports, agent = forwards.onto_reused(client, inst, req, instances)
                return Session(inst["name"], slot, inst["config"].get(f"{KEY}session_id") or
                               new_session_id(), True, False, req.workspace, ports=ports, ssh_agent=agent)
        forwards.check_ports_free(req.ports, instances)  # before anything is made
        slot = choose_slot(set(existing), wanted=req.slot, max_slots=req.max_slots)
        if req.slot > 0 and slot != req.slot:
            log(f"Slot {req.slot} is busy; using slot {slot}")
        elif req.slot <= 0:
            log(f"Auto-allocated slot {slot}")
        name = naming.container_name(str(req.workspace), slot, prefix=req.prefix)
        session_id = req.session_id or new_session_id()
        root = root_disk(client, req.disk, log) if req.disk else None
        config, devices = container_spec(
            image=req.image, workspace=req.workspace, slot=slot, session_id=session_id,
            persistent=req.persistent, tool=req.tool.name, mounts=req.mounts, storage=req.storage,
            host_uid=req.host_uid, host_gid=req.host_gid, code_uid=req.code_uid, shift=req.shift,
            base_config=req.base_config, profile=req.profile, branch=req.branch, root=root,
            masks=req.masks)
        devices.update(forwards.devices(req))
        for mount in [*req.mounts, *([Mount(req.storage, STORAGE)] if req.storage else [])]:
            mount.host.mkdir(parents=True, exist_ok=True)
        try:
            create_pinned(client, name, image=req.image, config=config, devices=devices, instances=instances)
        except ImageNotFoundError:
            if client.image_exists(req.image):
                raise
            raise NotFoundError(f"image {req.image} not found",
                                "build it with 'coi build'" if req.image == "coi"
                                else f"build it with 'coi build custom {req.image} --script FILE'") from None
        return Session(name, slot, session_id, req.persistent, True, req.workspace, ports=req.ports,
                       ssh_agent=bool(req.ssh_agent))


# Storage drivers that hold a root disk to its ``size`` (btrfs with a qgroup, which Incus
# enables; the others by their own volume size). A dir pool does only on ext4 or XFS with
# project quotas, and Incus skips the size silently elsewhere.
SIZED_DRIVERS = ("btrfs", "zfs", "lvm", "lvmcluster", "ceph", "linstor", "truenas")


def root_disk(client: IncusClient, size: str, log: Log) -> dict[str, str]:
    """The root disk of ``[limits] disk``: the coi profile's, sized (``spec.sized_root``);
    a line says so when its pool may not enforce the size."""
    from coi.host.daemon import COI_PROFILE

    try:
        profile_root = (client.profile(COI_PROFILE).get("devices") or {}).get("root")
    except NotFoundError:
        profile_root = None
    root = sized_root(profile_root, size)
    driver = next((p.get("driver") for p in client.storage_pools() if p.get("name") == root["pool"]), None)
    if driver not in SIZED_DRIVERS:
        log(f"Warning: storage pool {root['pool']} ({driver or 'unknown driver'}) may not hold the root disk "
            f"to [limits] disk = {size} (Incus enforces it on btrfs, zfs and lvm pools; on dir only with "
            "project quotas)")
    return root


def create_pinned(client: IncusClient, name: str, *, image: str, config: Mapping[str, str],
                  devices: Mapping[str, Mapping[str, str]], instances: list[dict[str, Any]],
                  ephemeral: bool = False) -> None:
    """``create_container`` with the NIC pinned to a free address (``coi.network.pin_nic``),
    so its rules can go on before it starts. Call under ``network.address_lock`` with a
    fresh list of ``instances``."""
    from coi import network

    config, devices = dict(config), dict(devices)
    pin = network.pin_nic(client, instances)
    if pin:
        config.update(pin.config)
        devices.update(pin.devices)
    create_container(client, name, image=image, config=config, devices=devices, files=pin.files if pin else None,
                     ephemeral=ephemeral)


def launch_container(client: IncusClient, name: str, *, image: str, ephemeral: bool, lock_dir: Path) -> None:
    """A stopped container of ``coi container launch``: coi's settings and a pinned NIC."""
    from coi import network

    network.check_name(name)
    config = launched_config(name, image=image, ephemeral=ephemeral, prefix=naming.container_prefix())
    with network.address_lock(lock_dir):
        create_pinned(client, name, image=image, config=config, devices={},
                      instances=client.instances(recursion=1), ephemeral=ephemeral)


def create_container(client: IncusClient, name: str, *, image: str, config: Mapping[str, str],
                     devices: Mapping[str, Mapping[str, str]], files: Mapping[str, bytes] | None = None,
                     ephemeral: bool = False) -> None:
    """Create a stopped container and write ``files`` (root's, replacing links) into it;
    an interruption meanwhile acts once it exists, and then removes it again."""
    created = False
    try:
        with deferred_signals():
            client.create_instance(name, image=image, profiles=["coi"], config=config, devices=devices,
                                   ephemeral=ephemeral)
            created = True
        for path, content in (files or {}).items():
            try:
                client.delete_file(name, path)
            except NotFoundError:
                pass
            client.push_file(name, path, content, mode=0o644)
    except BaseException:
        if created:
            with signals_ignored():
                remove_container(client, name)
        raise


@contextmanager
def cleanup_on_interrupt(client: IncusClient, session: Session) -> Iterator[None]:
    """An interruption or failure during set-up removes the container set-up created."""
    try:
        yield
    except BaseException:
        if session.created:
            with signals_ignored():
                remove_container(client, session.name)
        raise


def remove_container(client: IncusClient, name: str) -> None:
    """Force-stop and delete; a container that is already gone is fine."""
    try:
        if not is_stopped(client.instance(name)):
            client.stop(name, force=True)
        client.delete(name)
    except NotFoundError:
        pass


def ensure_running(client: IncusClient, name: str) -> None:
    """Start the container if needed (its mount sources checked first) and wait until it
    accepts commands.

    Readiness is proven with ``true``: harmless to run again when Incus loses
    track of it (see ``once_argv``).
    """
    inst = client.instance(name)
    if inst["status"] == "Running":
        return
    check_mount_sources(inst)
    with deferred_signals():
        client.start(name)

    def accepts_exec() -> bool:
        try:
            return client.exec(name, ["true"], capture=False).exit_code == 0
        except OperationFailedError:
            return False  # init not ready yet ("Failed to retrieve PID ...")
    wait_for(accepts_exec, timeout=30, what=f"{name} to accept commands", first_interval=0.02)


def wait_stopped(client: IncusClient, name: str, timeout: float) -> bool:
    """Whether the container is really stopped (or gone) within ``timeout``."""
    def stopped() -> bool:
        try:
            return is_stopped(client.instance(name))
        except NotFoundError:
            return True
    try:
        wait_for(stopped, timeout=timeout, what=f"{name} to stop")
    except TimedOutError:
        return False
    return True
