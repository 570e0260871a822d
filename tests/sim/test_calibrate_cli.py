"""`foe sim calibrate` writes its fit under --out and leaves the calibration shipped in the package
alone unless --save is given; the fitted cluster file works as `--cluster PATH`."""

from __future__ import annotations

from foe.cli.main import main
from foe.sim.hardware import CALIBRATED_FILE, get_cluster


def test_calibrate_writes_out_and_leaves_package_data(tmp_path, capsys) -> None:
    shipped = CALIBRATED_FILE.read_bytes()
    assert main(["sim", "calibrate", "--out", str(tmp_path)]) == 0
    assert CALIBRATED_FILE.read_bytes() == shipped
    fitted = tmp_path / "cpu_gloo_fitted.json"
    assert (tmp_path / "calibration.json").exists() and fitted.exists()
    assert f"--cluster {fitted}" in capsys.readouterr().out
    cluster = get_cluster(str(fitted))
    assert cluster.name == "cpu-gloo" and 0 < cluster.matmul_efficiency <= 1
