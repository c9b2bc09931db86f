"""The curation ablation (configs/demo.py:ablation) runs end to end, shrunken: curated vs uncurated training
set at equal steps, and a findings table with intervals."""

import json

import pandas as pd
import pytest


def test_ablation_config_is_the_demo_with_the_ablation_switched_on():
    from vitally_jax import config_lib

    a, d = config_lib.load("demo", "ablation"), config_lib.load("demo", "")
    assert a.ablation.enabled and not d.ablation.enabled
    assert len(a.ablation.seeds.split(",")) == 2
    assert a.train.total_steps == d.train.total_steps  # equal steps for both arms, as in the default
    with pytest.raises(Exception, match="unknown argument"):
        config_lib.load("demo", "ablate")


@pytest.mark.slow
def test_shrunken_ablation_runs_and_reports_intervals(tmp_path):
    from vitally_jax import config_lib, demo

    config = config_lib.load("demo", "ablation,ci")
    # shrunken further for the test suite: one seed per arm, one pooling, fewer CV seeds
    config.ablation.seeds = "0"
    config.probe.pooling = "mean"
    config.probe.select_seeds = 1
    config.probe.cv_seeds = 2
    config.probe.backend = "sklearn"  # no probe compilation for these small problems
    config.train.total_steps = 20
    config.train.checkpoint.every_steps = 20
    config.train.log.recon_every_steps = 20
    assert demo.run(config, tmp_path / "ab") == 0
    results = json.loads((tmp_path / "ab" / "results.json").read_text())
    runs = pd.DataFrame(results["results"])
    assert sorted(runs["variant"]) == ["curated_seed0", "uncurated_seed0"]
    # the uncurated arm trains on every image, the curated arm on fewer
    n = runs.set_index("variant")["training images"]
    assert n["curated_seed0"] < n["uncurated_seed0"]
    f = pd.DataFrame(results["findings"])
    assert set(f["metric"]) == {"CORUM recall", "gene-group probe"}
    assert (f["lo"] <= f["difference"]).all() and (f["difference"] <= f["hi"]).all()
    assert set(f["verdict"]) <= {"holds", "fails", "not resolved"}
    assert (tmp_path / "ab" / "report.html").is_file()
