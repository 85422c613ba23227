import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from wgsef.run import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Intra-op threads of every test (and of the runs tests start: OMP_NUM_THREADS is inherited). 1 by default;
# WGSEF_TEST_THREADS=2 runs the suite with 2, to check that no test depends on one thread count's arithmetic.
THREADS = int(os.environ.get("WGSEF_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and on THREADS intra-op threads (1 unless WGSEF_TEST_THREADS says otherwise): the test models
    are tiny, and on a 2-core machine shared with another process OpenMP threads waiting on each other make
    them many times slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg():
    """Compose the training config with overrides (Hydra compose API, no run directory)."""
    register_resolvers()

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    return make


@pytest.fixture
def full_and_resumed(make_cfg, tmp_path, monkeypatch):
    """Run a config into tmp_path/full uninterrupted, and into tmp_path/cut crashed after its first epoch's
    checkpoint and then resumed; returns both directories, for tests that compare them."""
    from wgsef.run import run
    from wgsef.train import Trainer

    def both(*overrides: str):
        run(make_cfg(*overrides), tmp_path / "full")
        save = Trainer.save

        def crash_after_first_epoch(self):
            save(self)
            if self.state.epoch == 1:
                raise KeyboardInterrupt("simulated crash")

        monkeypatch.setattr(Trainer, "save", crash_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            run(make_cfg(*overrides), tmp_path / "cut")
        monkeypatch.setattr(Trainer, "save", save)
        assert run(make_cfg(*overrides, "resume=true"), tmp_path / "cut")["resumed"]
        return tmp_path / "full", tmp_path / "cut"
    return both
