"""Every shipped job config validates, and every job rejects an unknown key, a wrong type and unsafe
YAML before doing any work, with a message naming the key."""

from __future__ import annotations

import os

import pytest

from pipeline.config import ConfigError, load_config
from ray_jobs.cli import JOBS, config_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped(job: str) -> str:
    return os.path.join(REPO, "configs", f"{job}.yaml")


@pytest.mark.parametrize("job", [j for j in JOBS if os.path.exists(shipped(j))])
def test_shipped_config_validates_and_rejects_bad_keys(job):
    model = config_model(job)
    load_config(model, shipped(job))
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(model, shipped(job), ["no_such_key=1"])
    if "ray" not in model.model_fields:  # driver-only jobs (prepare, select, evaluate)
        return
    with pytest.raises(ConfigError, match=r"ray\.include_dashbord"):
        load_config(model, shipped(job), ["ray.include_dashbord=true"])
    with pytest.raises(ConfigError, match=r"ray\.num_cpus"):
        load_config(model, shipped(job), ["ray.num_cpus=lots"])


@pytest.mark.parametrize("job", ["generate", "solve", "infer"])
def test_sharded_jobs_share_pool_output_and_cache_options(job):
    cfg = load_config(config_model(job), shipped(job), ["pool.max_actors=3", "output.shard_size=7",
                                                        "cache_dir=/tmp/x", "pricing.prompt_per_1k=0.5"])
    assert (cfg.pool.max_actors, cfg.output.shard_size, cfg.cache_dir) == (3, 7, "/tmp/x")
    with pytest.raises(ConfigError, match=r"output\.shard_size"):
        load_config(config_model(job), shipped(job), ["output.shard_size=0"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_unsafe_yaml_is_refused(tmp_path, where):
    """A python tag is refused as YAML, not executed. Would an unsafe loader pass this? No: ``str('out')``
    builds a valid value (so only the tag can make it fail), and ``os.mkdir`` leaves a trace if run."""
    trace = tmp_path / "executed"
    tagged = f"!!python/object/apply:os.mkdir ['{trace}']"
    valid = "!!python/object/apply:str ['/tmp/out']"
    if where == "file":
        bad = tmp_path / "bad.yaml"
        bad.write_text(open(shipped("generate")).read() + f"cache_dir: {valid}\nlabel: {tagged}\n")
        args: tuple = (str(bad),)
    else:
        args = (shipped("generate"), [f"cache_dir={valid}"])
    with pytest.raises(ConfigError, match=r"not valid YAML.*python/object/apply"):
        load_config(config_model("generate"), *args)
    assert not trace.exists(), "the YAML loader ran code from a config"
