"""experiments/train.py: recipe configs, a shortened digits run end to end, and refusals of bad input.

(a) every recipe in experiments/configs/ parses and converts to a valid TrainConfig + CLIPConfig
    (no training); unknown keys and unavailable data sources raise naming them; WiSE-FT.
(b) the digits config, shortened on the command line, trains in a subprocess: metrics, report,
    plots, a checkpoint that `clipjax.load` reads back with the same zero-shot accuracy; a second
    run in the same workdir resumes the finished run and re-evaluates.
(c) an unknown `--config.foo`, a batch that does not divide over the mesh and a workdir holding
    another architecture exit non-zero, name the problem and leave the workdir unchanged.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")
CONFIGS = os.path.join(EXP, "configs")
RECIPES = {  # file -> get_config arguments to try
    "openclip_vit_b32_laion400m.py": [None],
    "siglip_b16.py": [None],
    "cloob_rn50.py": [None, "paper_defaults"],
    "lit.py": [None, "scratch_text"],
    "finetune_wiseft.py": [None],
    "digits.py": [None],
    "adversarial.py": ["tecoa", "pmg-aft", "fare", "advflyp"],
}
SHORT = ["--config.total_steps=12", "--config.warmup_steps=4", "--config.log_every=4", "--config.eval_every=6",
         "--config.checkpoint_every=6", "--config.report.min_accuracy=0.0", "--noprogress"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train_py():
    return _load("experiments_train", os.path.join(EXP, "train.py"))


def test_recipe_files_are_all_listed():
    found = {f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "common.py"}
    assert found == set(RECIPES), f"update RECIPES: {sorted(found ^ set(RECIPES))}"


@pytest.mark.parametrize("fname,arg", [(f, a) for f, args in RECIPES.items() for a in args])
def test_recipe_converts(train_py, fname, arg):
    from clipjax.config import CLIPConfig
    from clipjax.train.config import TrainConfig

    cfg = _load(f"recipe_{fname[:-3]}", os.path.join(CONFIGS, fname)).get_config(arg)
    cfg.lock()  # as config_flags does
    tc = train_py.train_config(cfg)
    mc = train_py.model_config(cfg)
    assert isinstance(tc, TrainConfig) and isinstance(mc, CLIPConfig)
    for key in ("total_steps", "batch_size", "seed", "log_every", "checkpoint_every", "eval_every"):
        assert key in cfg
    assert {"data", "fsdp", "tensor"} <= set(cfg.mesh)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    assert CLIPConfig.from_dict(mc.to_dict()) == mc
    if tc.loss == "siglip":
        assert mc.is_siglip
    if cfg.data.name == "files":  # provided; the recipe's shards are not on this machine, and the error names them
        from clipjax.data import DataError

        with pytest.raises(DataError, match=r"shard (pattern )?'.*' .*(does not exist|matches no file)"):
            train_py.build_data(cfg.data.to_dict(), mc, tc)
    elif fname != "digits.py":  # recipes name sources this script does not provide yet
        with pytest.raises(train_py.DataSourceError, match=repr(cfg.data.name)):
            train_py.build_data(cfg.data.to_dict(), mc, tc)


def test_recipe_numbers(train_py):
    cfgs = {f: _load(f"recipe_{f[:-3]}", os.path.join(CONFIGS, f)).get_config() for f in RECIPES}
    b32 = train_py.train_config(cfgs["openclip_vit_b32_laion400m.py"])
    assert (b32.batch_size, b32.lr, b32.weight_decay, b32.warmup_steps, b32.dtype) == (32768, 5e-4, 0.2, 2000,
                                                                                       "bfloat16")
    assert b32.total_steps == 32 * (407_000_000 // 32768)
    sig = train_py.train_config(cfgs["siglip_b16.py"])
    sig_m = train_py.model_config(cfgs["siglip_b16.py"])
    assert (sig.loss, sig.lr, sig.weight_decay, sig.beta2) == ("siglip", 1e-3, 1e-4, 0.95)
    assert np.isclose(np.exp(sig_m.init_log_logit_scale), 10.0) and sig_m.init_logit_bias == -10.0
    cl = train_py.train_config(cfgs["cloob_rn50.py"])
    cl_m = train_py.model_config(cfgs["cloob_rn50.py"])
    assert (cl.loss, cl.hopfield_beta, cl_m.vision.arch) == ("cloob", 8.0, "resnet")
    assert np.isclose(np.exp(cl_m.init_log_logit_scale), 30.0) and np.isclose(np.exp(cl.max_log_logit_scale), 100.0)
    assert train_py.train_config(cfgs["lit.py"]).lock_image


def test_unknown_keys_are_named(train_py):
    from clipjax.config import ConfigError

    cfg = _load("recipe_digits", os.path.join(CONFIGS, "digits.py")).get_config()
    d = cfg.to_dict()
    with pytest.raises(ConfigError, match="lr_warmup"):
        train_py.train_config({**d, "lr_warmup": 5})
    d2 = {**d, "model": {"name": "ViT-B-32", "overrides": {"vision": {"widht": 8}}}}
    with pytest.raises(ConfigError, match="widht"):
        train_py.model_config(d2)
    with pytest.raises(ConfigError, match="model.name"):
        train_py.model_config({**d, "model": {"name": None, "overrides": {}}})


# ----------------------------------------------------------------------------- subprocess runs


def _env(devices: int | None = None):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(workdir, *extra, devices=None, timeout=300):
    cmd = [sys.executable, os.path.join(EXP, "train.py"), "--config", os.path.join(CONFIGS, "digits.py"),
           "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits") / "w"
    proc = _run(workdir, *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_digits_end_to_end(digits_run):
    import clipjax

    workdir, proc = digits_run
    for name in ("report.json", "metrics.jsonl", "loss.png", "similarity.png", "clipjax.json"):
        assert (workdir / name).exists(), name
    report = json.loads((workdir / "report.json").read_text())
    for key in ("zero_shot_accuracy", "train_seconds", "steps", "samples_per_sec", "checkpoint", "t2i_R@1",
                "i2t_R@5", "t2i_R@10"):
        assert key in report, key
    assert report["steps"] == 12 and report["reload_equal"] and report["trained_in_this_run"]
    assert os.path.isdir(report["checkpoint"]) and report["checkpoint"].endswith(os.path.join("12", "params"))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12]
    assert [r["step"] for r in rows if "eval/zero_shot_accuracy" in r] == [6, 12]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert "report" in proc.stdout and "zero-shot accuracy" in proc.stdout

    # reload here, independently of the script: same params -> the same accuracy, exactly
    sys.path.insert(0, EXP)
    try:
        import digits_data
    finally:
        sys.path.remove(EXP)
    cfg = _load("recipe_digits", os.path.join(CONFIGS, "digits.py")).get_config().to_dict()
    model = clipjax.load(str(workdir))
    src = digits_data.build(cfg["data"], model.config, cfg["batch_size"], cfg["seed"])
    assert src.eval_fn(model.params)["zero_shot_accuracy"] == report["zero_shot_accuracy"]


def test_digits_second_run_resumes(digits_run):
    workdir, _ = digits_run
    first = json.loads((workdir / "report.json").read_text())
    proc = _run(workdir, *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stderr
    again = json.loads((workdir / "report.json").read_text())
    assert not again["trained_in_this_run"] and again["steps"] == 12
    assert again["zero_shot_accuracy"] == first["zero_shot_accuracy"]
    assert again["train_seconds"] == first["train_seconds"]


def test_unknown_config_key_fails_before_writing(tmp_path):
    workdir = tmp_path / "w"
    proc = _run(workdir, "--config.foo=1", *SHORT)
    assert proc.returncode != 0
    assert "foo" in proc.stderr
    assert not workdir.exists()


def test_batch_not_divisible_by_mesh_fails_before_writing(tmp_path):
    workdir = tmp_path / "w"
    proc = _run(workdir, "--config.mesh.data=8", "--config.batch_size=12", *SHORT, devices=8)
    assert proc.returncode != 0
    assert "batch_size=12" in proc.stderr and "divisible" in proc.stderr
    assert not workdir.exists()


def test_other_architecture_in_workdir_fails_unchanged(digits_run):
    workdir, _ = digits_run
    before = _snapshot(workdir)
    proc = _run(workdir, "--config.model.overrides.vision.width=32", *SHORT)
    assert proc.returncode != 0
    assert "another architecture" in proc.stderr and "width" in proc.stderr
    assert _snapshot(workdir) == before


def test_adversarial_finetune_then_robustness_report(digits_run, tmp_path):
    """`adversarial.py:tecoa,digits` fine-tunes the demo's checkpoint (a few steps), then
    `experiments/robustness_digits.py` reports on both models (short settings)."""
    workdir, _ = digits_run
    ft = tmp_path / "tecoa"
    cmd = [sys.executable, os.path.join(EXP, "train.py"), "--config", os.path.join(CONFIGS, "adversarial.py") +
           ":tecoa,digits", f"--config.init_from={workdir}", "--config.total_steps=4", "--config.log_every=2",
           "--config.checkpoint_every=4", "--config.eval_every=0", "--workdir", str(ft), "--noprogress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    out = tmp_path / "rob"
    cmd = [sys.executable, os.path.join(EXP, "robustness_digits.py"), "--model", str(workdir), "--finetuned", str(ft),
           "--out", str(out), "--limit", "24", "--epsilons", "0,4", "--apgd-steps", "5", "--print-steps", "5",
           "--tca-ratios", "0,0.25"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("demo", "finetuned"):
        clean, attacked = report["robust_accuracy"][name]
        assert clean["pgd"] == clean["apgd_ce"] == clean["clean"]  # eps 0: nothing to attack
        assert attacked["pgd"] <= attacked["clean"] and attacked["apgd_ce"] <= attacked["clean"]
    assert {"ttc", "master_print", "calibration", "heads", "tca"} <= set(report)
    assert report["tca"][0]["flops_ratio"] == 1.0 and report["tca"][-1]["flops_ratio"] < 1.0
    for png in ("robust_accuracy.png", "heads.png", "master_print.png"):
        assert (out / png).stat().st_size > 0, png
    assert "| demo |" in proc.stdout
