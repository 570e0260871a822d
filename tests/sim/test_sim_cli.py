"""`foe sim` from the command line: calibrate writes its fit under --out and leaves the calibration
shipped in the package alone unless --save is given (the fitted cluster file works as `--cluster PATH`);
`--checkpoint` takes a run directory as every other command does."""

from __future__ import annotations

import json

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


def test_sim_takes_a_run_directory_as_checkpoint(tmp_path) -> None:
    """`--checkpoint` means the same in `foe sim` as elsewhere: a run directory resolves to its latest."""
    from foe.model.checkpoint import save_checkpoint
    from tests.conftest import build, tiny
    save_checkpoint(build(tiny("foe")), tmp_path / "run" / "step_00000003")
    (tmp_path / "run" / "latest").write_text("step_00000003\n")
    out = tmp_path / "sim"
    assert main(["sim", "forward", "--checkpoint", str(tmp_path / "run"), "--batch-sizes", "1,2", "--cluster", "cpu-gloo",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "forward_prefill.json").read_text())
    assert rows, "no rows written"
    assert main(["sim", "forward", "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2
