"""The cluster files (cluster/) and every shipped job config (configs/), checked without a cluster.

Fast: no network, no Ray started. The launcher config is validated against the JSON schema the installed Ray
ships (and Ray's own launcher checks); the KubeRay RayJob, the runtime env and the Dockerfile are checked for the
semantics a cluster would otherwise reject at run time; every YAML under configs/ must load with the config class
of the job its first line runs.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import puma_ray
from puma_ray.errors import ConfigError
from puma_ray.recipes.jobs import JOBS, job_of_script
from puma_ray.recipes.runs import load_job_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "configs"
LAUNCHER = CLUSTER / "a100-cluster.yaml"
RAYJOB = CLUSTER / "rayjob-migrate.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

def _yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_version() -> str:
    import ray
    return ray.__version__


# ---- Ray cluster launcher ---------------------------------------------------------------------------------------

def _ray_schema() -> dict:
    import ray.autoscaler  # the schema ships inside the installed ray package, next to the launcher
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"no ray-schema.json in the installed ray ({path})"
    return json.loads(path.read_text())


def test_launcher_config_matches_rays_schema():
    jsonschema.validate(_yaml(LAUNCHER), _ray_schema())


def test_launcher_schema_check_rejects_what_ray_up_would():
    """The validation above has teeth: a misspelt key or a non-integer resource fails it."""
    cfg, schema = _yaml(LAUNCHER), _ray_schema()
    typo = copy.deepcopy(cfg)
    typo["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    bad_resources = copy.deepcopy(cfg)
    bad_resources["available_node_types"]["a100"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_resources, schema)


def test_launcher_config_passes_rays_own_checks():
    """`ray up` fills the provider's defaults, then validates (schema + head type + worker bounds)."""
    # private API (the schema test above does not depend on it); ray is pinned in constraints.txt
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(_yaml(LAUNCHER)))


def test_launcher_semantics():
    cfg = _yaml(LAUNCHER)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head must not offer GPUs to Train workers"
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])

    gpu_types = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker node type with GPUs"
    for name, t in gpu_types.items():
        assert t["resources"]["GPU"] == 8, f"{name}: a p4d.24xlarge has 8 A100s"
        assert t["resources"]["CPU"] == 96
        assert t["node_config"]["InstanceType"] == "p4d.24xlarge"
        assert 0 <= t.get("min_workers", 0) <= t.get("max_workers", cfg["max_workers"])
        assert t.get("max_workers", 0) <= cfg["max_workers"]
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for n, t in types.items() if n != head)
    assert cfg["idle_timeout_minutes"] > 0

    # Ray 2.60 token auth: every `ray start` in token mode, and the token on every node
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert cfg["docker"]["image"].endswith(f"/puma-ray:{puma_ray.__version__}")


def test_paper_config_fits_the_launcher_cluster():
    from puma_ray.recipes.migration import MigrateJobConfig
    engine = load_job_config(MigrateJobConfig, str(CONFIGS / "migrate_llama1b_to_3b_amazon.yaml")).engine
    cfg = _yaml(LAUNCHER)
    node = cfg["available_node_types"]["a100"]
    gpus, cpus = node["resources"]["GPU"], node["resources"]["CPU"]
    assert engine.use_gpu
    assert math.ceil(engine.num_workers / gpus) <= node["max_workers"], "more GPUs than the cluster can grow to"
    per_node = min(engine.num_workers, gpus)
    assert per_node * engine.cpus_per_worker < cpus, "Train workers would take every CPU: Ray Data starves"


# ---- KubeRay RayJob ---------------------------------------------------------------------------------------------

def _entrypoint_config(entrypoint: str) -> tuple[str, str]:
    argv = shlex.split(entrypoint)
    script = next(a for a in argv if a.startswith("jobs/") and a.endswith(".py"))
    return script, argv[argv.index("--config") + 1]


def test_rayjob_manifest():
    job = _yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]

    script, config = _entrypoint_config(spec["entrypoint"])
    assert script == "jobs/migrate.py"
    assert (REPO / script).is_file()
    assert config.startswith("configs/") and (REPO / config).is_file(), f"--config {config} is not in configs/"

    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version(), "rayVersion must match the Ray the image installs"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head, "headGroupSpec.template.spec.containers is empty"
    assert "nvidia.com/gpu" not in head[0].get("resources", {}).get("limits", {}), "the head is CPU only"
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-gpus")) == "0"

    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert all(isinstance(v, int) for v in (lo, n, hi))
        assert 0 <= lo <= n <= hi, f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas"
        containers = group["template"]["spec"]["containers"]
        assert containers
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpu_groups, "no worker group has nvidia.com/gpu limits"
    a100 = gpu_groups[0]["template"]
    res = a100["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 8
    gpus = res["limits"]["nvidia.com/gpu"]
    assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
    assert a100["spec"].get("nodeSelector") and a100["spec"].get("tolerations")

    images = {c["image"] for c in head} | {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {_yaml(LAUNCHER)["docker"]["image"]}, "the RayJob and the launcher run different images"


def test_rayjob_runtime_env_matches_the_cli_one():
    job_env = yaml.safe_load(_yaml(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert job_env["working_dir"]
    assert job_env["env_vars"] == _yaml(RUNTIME_ENV)["env_vars"], \
        "cluster/rayjob-migrate.yaml's runtimeEnvYAML and cluster/runtime_env.yaml set different env_vars"


# ---- runtime env ------------------------------------------------------------------------------------------------

def test_runtime_env():
    from ray.runtime_env import RuntimeEnv
    env = _yaml(RUNTIME_ENV)
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "config"}, sorted(env)
    assert env["working_dir"] == "."
    assert {".venv", "runs", "models"} <= set(env["excludes"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items()), "values must be strings"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "DS_ACCELERATOR" not in env["env_vars"], "on GPUs the Train worker picks cuda itself; cpu would break it"
    RuntimeEnv(**env)  # Ray's own validation of each field


def test_driver_adds_no_conflicting_runtime_env(monkeypatch):
    """Inside `ray job submit`, jobs/migrate.py calls ensure_ray, which connects with ray.init(address=...). Ray
    refuses (ValueError "Failed to merge the Job's runtime env") a driver runtime_env that repeats one of the
    job's env_vars keys, unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1. The driver's environment holds the job's env_vars,
    so anything ensure_ray forwards from it must not collide with cluster/runtime_env.yaml."""
    import ray

    from puma_ray.ray_layer import session
    from puma_ray.ray_layer.compat import train_v2_env

    job_env = _yaml(RUNTIME_ENV)
    for key, value in {**train_v2_env(), **job_env["env_vars"]}.items():
        monkeypatch.setenv(key, value)  # the driver's environment under the job (restored afterwards)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    captured = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: captured.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(session, "check_reachable", lambda *a, **kw: None)  # no head here: only the init's arguments
    session.ensure_ray()
    assert captured.get("address") == "127.0.0.1:6379", "ensure_ray did not connect to the job's cluster"
    driver_env = captured.get("runtime_env") or {}
    override = job_env["env_vars"].get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1"
    try:
        from ray.runtime_env.runtime_env import _merge_runtime_env
    except ImportError:  # private helper moved: apply its documented rule directly
        clash = (set(job_env) - {"env_vars"}) & (set(driver_env) - {"env_vars"})
        clash |= set(job_env.get("env_vars", {})) & set(driver_env.get("env_vars") or {})
        assert override or not clash, f"driver runtime_env repeats the job's {sorted(clash)}"
    else:
        merged = _merge_runtime_env(copy.deepcopy(job_env), copy.deepcopy(driver_env), override=override)
        assert merged is not None, f"Ray would refuse to merge the driver's runtime_env {driver_env} with the job's"


# ---- image ------------------------------------------------------------------------------------------------------

def test_dockerfile_installs_cuda_torch_and_the_pins():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M)
    assert base and f":{_ray_version()}-" in base.group(1), "the base image must carry the pinned Ray"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)

    cpu_pin = re.search(r"^torch==([\w.]+)\+cpu$", (REPO / "constraints.txt").read_text(), re.M)
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M)
    assert torch_arg, "the Dockerfile must install torch itself"
    if cpu_pin:  # the CPU pin must be dropped on GPUs, and the CUDA build be the same release
        assert torch_arg.group(1) == cpu_pin.group(1)
        assert "grep -v -E '^torch=='" in text
        assert not re.search(r"pip install[^\n]*-c constraints\.txt", text), "constraints.txt pins the CPU torch"
    assert "torch.version.cuda" in text, "the build must fail on a CPU build of torch"
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [w for w in line.split() if not w.startswith("--")][:-1]  # the last word is the destination
        for path in sources:
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repository"


# ---- every shipped job config -----------------------------------------------------------------------------------

CONFIG_FILES = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])


def test_there_are_configs():
    names = {p.name for p in CONFIG_FILES}
    assert {"migrate_llama1b_to_3b_amazon.yaml", "migrate_smollm2_to_gemma3_ml100k.yaml", "migrate_default.yaml",
            "sweep_default.yaml"} <= names


@pytest.mark.parametrize("job", sorted(JOBS), ids=str)
def test_every_job_of_the_table_exists_and_loads_its_default(job):
    """The JOBS table names real scripts, config classes and default files; each script reads its own entry."""
    entry = JOBS[job]
    assert (REPO / entry.script).is_file(), entry.script
    code = (REPO / entry.script).read_text()
    cli = REPO / "puma_ray" / "cli" / f"{job}.py"  # a script over puma_ray/cli/ (an installed command) runs that code
    if f"from puma_ray.cli.{job} import" in code:
        code = cli.read_text()
    assert f'JOBS["{job}"]' in code, f"{entry.script} does not load its JOBS entry"
    cls = entry.config_cls()
    if entry.default_config:
        assert isinstance(entry.load(None), cls)
    else:
        with pytest.raises(ConfigError, match="needs --config"):
            entry.load(None)


def test_default_configs_name_their_job():
    """A job's default file is run by that job: its first line says so."""
    for job in JOBS.values():
        if job.default_config:
            first = (REPO / job.default_config).read_text().splitlines()[0]
            assert first.startswith(f"# python {job.script}"), (job.name, first)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_runs_as_its_first_line_says(path):
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    assert first.startswith("#"), f"{path.name}: the first line must be a comment with the command that runs it"
    argv = shlex.split(first.lstrip("#"))
    scripts = [a for a in argv if re.fullmatch(r"jobs/\w+\.py", a)]
    assert scripts, f"{path.name}: the first line names no jobs/<job>.py: {first!r}"
    script = scripts[0]
    i = argv.index(script)
    assert i > 0 and re.search(r"python[\d.]*$", argv[i - 1]), f"{path.name}: {script} is not run by python"
    job = job_of_script(script)  # through the JOBS table: the config class the script really loads
    if f"configs/{path.name}" != job.default_config:
        assert "--config" in argv[i:] and argv[argv.index("--config", i) + 1] == f"configs/{path.name}", \
            f"{path.name}: the command must pass --config configs/{path.name}"
    cfg = job.load(str(path))
    assert isinstance(cfg, job.config_cls())
