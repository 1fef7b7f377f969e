"""Deployment files: cluster.yaml, jobs/ (entrypoint, runtime env, job configs, RayJob, Dockerfile).

Static checks only, no Ray instance: the cluster-launcher config against the JSON schema Ray
ships (and through the same preparation ``ray up`` runs before it calls AWS), the job configs
through ``zslabel.config.JobConfig`` (keys and validation), the runtime env through Ray's own
parser, the KubeRay manifest's structure, version agreement between the files, and a scan for
anything that looks like a credential. The entrypoint tests run ``jobs/label_job.py`` in a
subprocess the way Ray does (repository root on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
JOBS = ROOT / "jobs"
LABEL_JOB = JOBS / "label_job.py"
RUNTIME_ENV = JOBS / "runtime_env.yaml"
RAYJOB = JOBS / "rayjob.yaml"
DOCKERFILE = JOBS / "Dockerfile"
LOCAL_CONFIG = JOBS / "configs" / "local.yaml"
S3_CONFIG = JOBS / "configs" / "s3_gpu.yaml"
JOB_CONFIGS = [LOCAL_CONFIG, S3_CONFIG]

# fsspec storage_options keys that carry credentials (s3fs, gcsfs, adlfs); they must come from
# the environment or the instance/pod identity, never from a committed config.
CREDENTIAL_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "session_token", "account_key", "sas_token", "client_secret",
    "connection_string", "credentials",
})

GPU_INSTANCE_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")


def _yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def _deploy_files() -> list[Path]:
    files = [CLUSTER_YAML, *sorted(p for p in JOBS.rglob("*") if p.is_file())]
    docs = ROOT / "docs" / "cluster.md"
    if docs.exists():
        files.append(docs)
    return [p for p in files if "__pycache__" not in p.parts]


# --------------------------------------------------------------------------- secret scanning

_SECRET_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("AWS secret key field", re.compile(r"aws_secret_access_key", re.IGNORECASE)),
    ("AWS session token field", re.compile(r"aws_session_token", re.IGNORECASE)),
    ("token with a value", re.compile(
        r"\b[\w.-]*token\s*[:=]\s*(?![\s#]|$|['\"]{2})", re.IGNORECASE)),
    ("password/secret/api key with a value", re.compile(
        r"\b(?:password|passwd|secret|api[_-]?key)\s*[:=]\s*(?![\s#]|$|['\"]{2})",
        re.IGNORECASE)),
    ("private key block", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
]


def find_secrets(text: str) -> list[str]:
    """Return ``"line N: <kind>"`` for every line of ``text`` that looks like it holds a secret.

    Comments are scanned too: a key pasted into a comment leaks just the same.
    """
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        for kind, pattern in _SECRET_PATTERNS:
            if pattern.search(line):
                hits.append(f"line {number}: {kind}")
    return hits


def test_secret_scanner_flags_credential_shapes_and_passes_prose():
    # Built at run time so this file itself never contains a credential-shaped literal.
    fake_key_id = "AKIA" + "Q" * 16
    flagged = [
        f"access: {fake_key_id}",
        "aws_" + "secret_access_key = abc",
        "hf_token: abcdef",
        "  token: 'xyz'",
        "RAY_AUTH_TOKEN=deadbeef",
        "password: hunter2",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "hf_" + "a1B2" * 9,
    ]
    for line in flagged:
        assert find_secrets(line), line
    benign = [
        "# credentials come from the instance role, never from this file",
        "token:",
        "token: ''",
        "token:   # set on the cluster",
        'TOKENIZERS_PARALLELISM: "false"',
        "ssh_user: ubuntu",
        "storage_options: {}",
    ]
    for line in benign:
        assert not find_secrets(line), line


@pytest.mark.parametrize("path", _deploy_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_deploy_file_holds_no_secrets(path):
    assert find_secrets(path.read_text()) == []


# --------------------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(_yaml(CLUSTER_YAML)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_cluster_yaml_passes_ray_up_preparation():
    # The steps `ray up` runs on the file before it talks to the cloud: merge with the AWS
    # defaults, then validate (schema plus cross-field rules such as head_node_type and
    # min/max workers). Private API of the pinned Ray.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_yaml(CLUSTER_YAML))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0


def test_cluster_head_takes_no_work_and_gpu_workers_autoscale_from_zero():
    config = _yaml(CLUSTER_YAML)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}

    gpu_types = {name: t for name, t in types.items()
                 if t["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)}
    assert gpu_types, "no GPU worker type"
    s3 = _yaml(S3_CONFIG)
    max_actors = s3["concurrency"][1]
    for name, node_type in gpu_types.items():
        assert name != config["head_node_type"]
        assert node_type["min_workers"] == 0, name
        # Every labeler actor of the GPU job needs its own GPU node (1 GPU per g5.2xlarge).
        assert node_type["max_workers"] >= max_actors * s3["num_gpus_per_actor"], name
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in gpu_types.values())


def test_cluster_workers_get_storage_access_from_an_instance_profile():
    config = _yaml(CLUSTER_YAML)
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue  # Ray attaches its own profile to the head.
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), name


def test_cluster_mounts_the_checkout_without_local_state_and_installs_it():
    config = _yaml(CLUSTER_YAML)
    assert config["file_mounts"] == {"~/zslabel": "."}
    # .gitignore as an rsync filter keeps the local .venv and outputs off the nodes.
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored or "/.venv/" in ignored
    # pip builds the package from the mounted checkout: these must be in it.
    missing = [name for name in ("pyproject.toml", "README.md", "zslabel")
               if not (ROOT / name).exists()]
    assert not missing, f"`pip install ~/zslabel` on the nodes would fail: {missing} missing"
    commands = " ; ".join(config.get("setup_commands", []))
    assert re.search(r"pip install\b.*\$HOME/zslabel\[s3\]", commands), commands


# --------------------------------------------------------------------------- job configs

@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_validates_as_a_job_config(path):
    import dataclasses

    from zslabel.config import JobConfig

    raw = _yaml(path)
    assert isinstance(raw, dict)
    known = {f.name for f in dataclasses.fields(JobConfig)}
    assert not set(raw) - known, f"unknown config keys: {sorted(set(raw) - known)}"

    # What `zslabel label --config` does before reading any image: parse, then validate.
    config = JobConfig.from_yaml(str(path))
    config.validate()
    assert config.input and config.output and config.model
    assert len(set(config.labels)) == len(config.labels), "duplicate labels"
    assert config.top_k <= len(config.labels)
    assert config.concurrency is not None
    assert config.num_gpus_per_actor >= 0

    options = raw.get("storage_options") or {}
    assert isinstance(options, dict)
    assert not {k.lower() for k in options} & CREDENTIAL_OPTION_KEYS


def test_local_config_labels_the_bundled_shapes_on_cpu():
    from zslabel_dev.shapes import all_labels

    config = _yaml(LOCAL_CONFIG)
    assert config["labels"] == all_labels()
    assert config["model"] == "models/shapes-clip"
    assert config["input"] == "examples/shapes"
    assert config["output"] == "out/shapes"
    assert config["num_gpus_per_actor"] == 0
    assert config["mode"] == "overwrite"


def test_local_config_paths_exist_in_the_repository():
    config = _yaml(LOCAL_CONFIG)
    missing = [config[k] for k in ("model", "input") if not (ROOT / config[k]).is_dir()]
    assert not missing, f"local example needs {missing} in the repository"


def test_s3_config_targets_s3_with_one_gpu_per_actor():
    config = _yaml(S3_CONFIG)
    assert config["input"].startswith("s3://") and config["output"].startswith("s3://")
    assert config["model"] == "openai/clip-vit-base-patch32"
    assert config["num_gpus_per_actor"] == 1
    assert config["concurrency"] == [1, 8]
    assert config["batch_size"] == 256
    assert config["top_k"] == 5
    assert config["mode"] == "resume"


# --------------------------------------------------------------------------- runtime env

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_runtime_env_is_accepted_by_ray_and_ships_the_repository():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # Exactly what `ray job submit --runtime-env jobs/runtime_env.yaml` does with the file.
    parsed = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))
    env = RuntimeEnv(**parsed)
    assert env["working_dir"] == "."
    packages = env["pip"]["packages"]
    assert packages, "pip list is empty"
    # "." / "-e ." would point at the remote node's directory, not this checkout.
    assert not [p for p in packages if p.startswith(("-e", ".", "/", "file:"))]


def test_runtime_env_pip_matches_the_package_requirements():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["s3"]]
    # Ray is the cluster's own; a job must never reinstall it.
    wanted = {canonicalize_name(r.name): str(r.specifier) for r in wanted
              if canonicalize_name(r.name) != "ray"}
    listed = [Requirement(p) for p in _yaml(RUNTIME_ENV)["pip"]]
    got = {canonicalize_name(r.name): str(r.specifier) for r in listed}
    assert got == wanted


# --------------------------------------------------------------------------- KubeRay RayJob

def test_rayjob_manifest_structure():
    from ray.runtime_env import RuntimeEnv

    job = _yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/label_job.py"]
    config_path = argv[argv.index("--config") + 1]
    assert (ROOT / config_path).is_file(), config_path

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is a path inside the image, which Ray's validator would look for here.
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert runtime_env.pop("working_dir") == workdir, "RayJob working_dir is not the image's repo"
    RuntimeEnv(**runtime_env)

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {})

    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                         .get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group requests GPUs"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= _yaml(S3_CONFIG)["concurrency"][1]
    images = {c["image"] for g in [head, *groups] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"head and workers run different images: {images}"
    # No secret material may be wired into the pods; identity comes from the service account.
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName")
        for container in pod["containers"]:
            assert "envFrom" not in container
            for var in container.get("env", []):
                assert "secretKeyRef" not in var.get("valueFrom", {})


def _ray_version_from_image(image: str) -> str | None:
    """Ray version of a ``rayproject/ray:X.Y.Z-pyNN[-variant]`` image; None for other images."""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+(?:-\w+)?", image)
    return match.group(1) if match else None


def test_ray_versions_agree_across_deploy_files():
    from packaging.requirements import Requirement
    from packaging.version import Version

    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    docker_version = _ray_version_from_image(base)
    assert docker_version, f"jobs/Dockerfile should build on a rayproject/ray image: {base}"
    rayjob_version = str(_yaml(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"])
    assert rayjob_version == docker_version
    # cluster.yaml may name the image built from jobs/Dockerfile instead of a Ray image.
    cluster_image = _yaml(CLUSTER_YAML)["docker"]["image"]
    cluster_version = _ray_version_from_image(cluster_image)
    assert cluster_version in (None, docker_version), cluster_image
    assert cluster_version or cluster_image.split(":")[0].endswith("zslabel"), cluster_image

    ray_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"]
                   if Requirement(r).name == "ray")
    assert Version(docker_version) in ray_req.specifier


# --------------------------------------------------------------------------- entrypoint

def _run_label_job(*args: str) -> subprocess.CompletedProcess:
    # Ray's working_dir puts the repository root on PYTHONPATH; do the same here.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(LABEL_JOB), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_label_job_forwards_arguments_to_the_label_subcommand():
    result = _run_label_job("--help")
    assert result.returncode == 0, result.stderr
    # Label-specific flags in the help prove "label" was put in front of the arguments.
    assert "--labels" in result.stdout and "--config" in result.stdout


def test_label_job_exits_with_the_cli_status(tmp_path):
    # A missing config is a configuration error: exit status 2 from zslabel.cli.main, which
    # an uncaught exception (status 1) would not give.
    result = _run_label_job("--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2, result.stderr
    assert "missing.yaml" in result.stderr
