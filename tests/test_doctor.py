from samout_edge.doctor import jetson_info


def test_not_a_jetson(tmp_path):
    assert jetson_info(tmp_path) is None


def test_jetson_orin_nano_jetpack6(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
    )
    info = jetson_info(tmp_path)
    assert info == {"model": "NVIDIA Jetson Orin Nano Developer Kit", "l4t": "36.4.3", "jetpack": "6.1/6.2"}


def test_other_device_tree_is_not_a_jetson(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5\x00")
    assert jetson_info(tmp_path) is None


def test_doctor_lists_every_backend_and_what_it_misses(run_cli):
    """From the registry's capabilities: each backend, what it needs installed, whether it needs a GPU."""
    from samout_edge.doctor import backends
    from samout_edge.runtime.registry import BACKENDS

    found = {b["name"]: b for b in backends()}
    assert list(found) == list(BACKENDS)
    assert found["ort"]["missing"] == [] and found["tensorrt"]["gpu"] and not found["ort"]["gpu"]
    code, out, _ = run_cli("doctor")
    assert code == 0 and "backend ort" in out and "backend openvino" in out
