"""Test setup: 8 fake CPU devices, set before jax initialises its backend."""

import os

# 8 fake devices; LLVM optimisation level 0: the suite is dominated by XLA:CPU compile time (about
# 3x less at level 0) and runs tiny programs, so the slower code costs less than it saves
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails (a missing reference package must not turn a parity test into a
    green skip); only tests marked `accelerator` may skip, on machines without a GPU/TPU."""
    outcome = yield
    report = outcome.get_result()
    if _CI and report.skipped and item.get_closest_marker("accelerator") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is not allowed: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped at collection under CI=true, which is not allowed: {report.longrepr}"


@pytest.fixture(scope="session")
def mesh8():
    """A (data=8, fsdp=1, tensor=1) mesh over the 8 fake CPU devices."""
    from clipjax.sharding import make_mesh

    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake devices before jax starts"
    return make_mesh(data=8)


PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")
CAPTIONS = ("an astronaut in a white space suit with an american flag", "a ginger cat lying on a blanket",
            "a cup of coffee on a saucer", "a rocket on the launch pad", "a photo of a dog", "")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random-init tiny clipjax checkpoint (`helpers.tiny_checkpoint`), shared by the command-line tests."""
    from helpers import tiny_checkpoint

    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="session")
def model(model_dir):
    """`clipjax.load(model_dir)`."""
    import clipjax

    return clipjax.load(model_dir)


@pytest.fixture(scope="session")
def photos():
    """Real photos shipped with scikit-image, uint8 [H, W, 3]."""
    import skimage.data

    return [getattr(skimage.data, n)() for n in PHOTO_NAMES]


@pytest.fixture(scope="session")
def captions():
    return list(CAPTIONS)

