"""The memory limit the service obeys and the CPUs its steps run on are its cgroup's, v2 or v1, read
from fake /sys trees."""

from __future__ import annotations

from pathlib import Path

from engine.models.cgroup import cgroup_cpu_limit, cgroup_memory

GIB = 2**30
UNLIMITED_V1 = str(9223372036854771712)


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def membership(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_a_v2_group_limit_with_page_cache_left_out_of_its_use(tmp_path):
    write(tmp_path / "sys" / "app", memory_max=str(14 * GIB), memory_current=str(5 * GIB),
          memory_stat=f"anon {3 * GIB}\ninactive_file {2 * GIB}\nactive_file 0\n")
    found = cgroup_memory(tmp_path / "sys", membership(tmp_path, "0::/app\n"))
    assert found == (14 * GIB, 3 * GIB)


def test_v2_max_means_no_limit(tmp_path):
    write(tmp_path / "sys", memory_max="max", memory_current="100")
    assert cgroup_memory(tmp_path / "sys", membership(tmp_path, "0::/\n")) is None


def test_a_v1_memory_controller_on_a_hybrid_host_with_the_lowest_ancestor_limit(tmp_path):
    v1 = tmp_path / "sys" / "memory"
    write(v1, memory_limit_in_bytes=UNLIMITED_V1, memory_usage_in_bytes=str(20 * GIB))
    write(v1 / "jobs", memory_limit_in_bytes=str(14 * GIB), memory_usage_in_bytes=str(6 * GIB),
          memory_stat=f"total_inactive_file {GIB}\n")
    write(v1 / "jobs" / "serve", memory_limit_in_bytes=UNLIMITED_V1, memory_usage_in_bytes=str(6 * GIB))
    write(tmp_path / "sys" / "unified")  # the v2 mount of a hybrid host holds no memory controller
    text = "9:pids:/\n4:memory:/jobs/serve\n0::/\n"
    assert cgroup_memory(tmp_path / "sys", membership(tmp_path, text)) == (14 * GIB, 5 * GIB)


def test_a_container_that_sees_only_its_own_group_at_the_mount(tmp_path):
    # Without a cgroup namespace the path names the host's hierarchy, which the container cannot see.
    write(tmp_path / "sys" / "memory", memory_limit_in_bytes=str(4 * GIB), memory_usage_in_bytes=str(GIB))
    found = cgroup_memory(tmp_path / "sys", membership(tmp_path, "5:memory:/docker/0123abcd\n"))
    assert found == (4 * GIB, GIB)


def test_no_cgroup_file_means_no_limit(tmp_path):
    assert cgroup_memory(tmp_path / "sys", tmp_path / "missing") is None


def test_a_v2_cpu_quota_in_cpus(tmp_path):
    write(tmp_path / "sys" / "app", cpu_max="250000 100000")
    assert cgroup_cpu_limit(tmp_path / "sys", membership(tmp_path, "0::/app\n")) == 2.5


def test_a_v2_cpu_max_of_max_is_no_quota(tmp_path):
    write(tmp_path / "sys" / "app", cpu_max="max 100000")
    assert cgroup_cpu_limit(tmp_path / "sys", membership(tmp_path, "0::/app\n")) is None


def test_a_v1_cpu_quota_is_the_lowest_up_the_tree_and_minus_one_is_none(tmp_path):
    v1 = tmp_path / "sys" / "cpu"
    write(v1 / "kubepods", cpu_cfs_quota_us="400000", cpu_cfs_period_us="100000")
    write(v1 / "kubepods" / "pod1", cpu_cfs_quota_us="200000", cpu_cfs_period_us="100000")
    write(v1 / "kubepods" / "pod1" / "app", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    text = "4:cpu,cpuacct:/kubepods/pod1/app\n0::/\n"
    assert cgroup_cpu_limit(tmp_path / "sys", membership(tmp_path, text)) == 2.0


def test_no_cpu_quota_anywhere(tmp_path):
    write(tmp_path / "sys" / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert cgroup_cpu_limit(tmp_path / "sys", membership(tmp_path, "4:cpu,cpuacct:/\n")) is None
    assert cgroup_cpu_limit(tmp_path / "sys", tmp_path / "missing") is None
