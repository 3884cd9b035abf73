"""The memory and CPU limits of the cgroup this process runs in (a container's, or a group a script
made), which psutil and os.sched_getaffinity do not see: v2, or v1's memory and cpu controllers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CgroupFiles:
    """One cgroup version's names for a group's memory limit, usage and reclaimable page cache."""

    limit: str
    usage: str
    inactive_file: str  # the memory.stat key


CGROUP_V2 = CgroupFiles("memory.max", "memory.current", "inactive_file")
CGROUP_V1 = CgroupFiles("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def cgroup_memory(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> tuple[int, int] | None:
    """The lowest memory limit over this process's cgroup and its ancestors (v2, or v1's memory
    controller), with that group's working set: usage less the page cache it can drop at once, as
    the kernel and kubelet count it. A read-only mapped weights file must not look like used memory.
    None where no group up the tree has a limit."""
    for version, is_v2, group in _groups(root, membership, "memory"):
        files = CGROUP_V2 if is_v2 else CGROUP_V1
        limited = []
        for folder in (group, *group.parents):
            if not folder.is_relative_to(version):
                break
            try:
                limited.append((int((folder / files.limit).read_text()), folder))
            except (OSError, ValueError):  # "max" means no limit; the namespace's root has no file
                continue
        if limited:
            limit, folder = min(limited)
            return limit, _working_set(folder, files)
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> float | None:
    """The lowest CPU quota, in CPUs, over this process's cgroup and its ancestors (v2's cpu.max, or
    v1's cpu.cfs_quota_us over cpu.cfs_period_us): what a container's `limits.cpu` or `--cpus` gives.
    None where no group up the tree has a quota."""
    for version, is_v2, group in _groups(root, membership, "cpu"):
        quotas = []
        for folder in (group, *group.parents):
            if not folder.is_relative_to(version):
                break
            try:
                if is_v2:
                    quota, period = (folder / "cpu.max").read_text().split()
                else:
                    quota, period = (folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text()
                cpus = int(quota) / int(period)
            except (OSError, ValueError, ZeroDivisionError):  # "max": no quota; the namespace's root has no file
                continue
            if cpus > 0:  # v1's -1: no quota
                quotas.append(cpus)
        if quotas:
            return min(quotas)
    return None


def _groups(root: Path, membership: Path, controller: str) -> list[tuple[Path, bool, Path]]:
    """(the hierarchy's mount, whether it is v2, this process's group in it), for v2 and for v1's
    `controller`. Inside a container the group's path may name the host's hierarchy while the
    container sees only its own group at the mount: then the mount is the group."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            version, is_v2 = root, True
        elif controller in controllers.split(","):
            version, is_v2 = root / controller, False
        else:
            continue
        group = version / path.lstrip("/")
        groups.append((version, is_v2, group if group.is_dir() else version))
    # v1's controller is the one that limits where both are mounted (a hybrid host)
    return sorted(groups, key=lambda found: found[1])


def _working_set(folder: Path, files: CgroupFiles) -> int:
    usage = int((folder / files.usage).read_text())
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        return max(usage - int(stat[files.inactive_file]), 0)
    except (OSError, ValueError, KeyError):
        return usage
