"""Image-map loading: the shipped example, every refusal with file, line and key, alias
chains and cycles, and resource merging."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from orchestrator.core.imagemap import ImageMapError, RequestRejected, Resources, load_image_map, parse_image_map
from orchestrator.core.messages import JobRequest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orchestrator-image-map.yaml"


def parse(text: str, tmp_path: Path):
    return parse_image_map(text, filename="map.yaml", base_dir=tmp_path)


def request(**fields) -> JobRequest:
    return JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y.git", commit_sha="a" * 40, **fields)


def test_example_map_loads_with_the_documented_defaults():
    image_map = load_image_map(EXAMPLE)
    assert image_map.default_label == "illumos-latest"
    assert image_map.resolve(None) == "openindiana-hipster"
    assert image_map.resolve("illumos-latest") == "openindiana-hipster"
    assert {n: (p.cpus, p.memory_mb) for n, p in image_map.sizes.items()} == {
        "small": (1, 1024),
        "medium": (2, 2048),
        "large": (4, 4096),
    }
    assert {"openindiana-hipster", "ubuntu-22.04"} <= set(image_map.images)


BASE = """\
default_label: a
images:
  a:
    backend: noop
    local_path: /x
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "    cpu: 2\n", "map.yaml:6: images.a.cpu: unknown key (did you mean 'cpus'?)"),
        (BASE + "    memory_mb: 12\n", "map.yaml:6: images.a.memory_mb: Input should be greater than or equal to 64"),
        (BASE + "    format: vmdk\n", "map.yaml:6: images.a.format: Input should be 'qcow2' or 'raw'"),
        (
            "default_label: a\nimages:\n  a:\n    local_path: /x\n    backend: xen\n",
            "map.yaml:5: images.a.backend: Input should be 'libvirt', 'zones' or 'noop'",
        ),
        (BASE + "    backend: libvirt\n", "map.yaml:6: duplicate key 'backend' (first on line 4)"),
        (
            "default_label: a\ndefault_label: b\nimages: {}\n",
            "map.yaml:2: duplicate key 'default_label' (first on line 1)",
        ),
        (
            BASE + "sizes:\n  s: {cpus: 0, memory_mb: 512}\n",
            "map.yaml:7: sizes.s.cpus: Input should be greater than or equal to 1",
        ),
        (BASE + "    size: huge\n", "map.yaml:6: images.a.size: unknown size preset 'huge'; define it under sizes"),
        (BASE + "    kernel: /no/such/vmlinuz\n", "map.yaml:6: images.a.kernel: file /no/such/vmlinuz does not exist"),
        (
            BASE + "    sha256: 1234\n",
            "map.yaml:6: images.a.sha256: Input should be a valid string: YAML read 1234 as a number; quote the value",
        ),
        (BASE + "    source: ftp://x/y\n", "map.yaml:6: images.a.source: String should match pattern"),
        (
            "default_label: zz\nimages:\n  a: {backend: noop, local_path: /x}\n",
            "map.yaml:1: default_label: 'zz' is neither an image label nor an alias",
        ),
        ("images:\n  a: {backend: noop, local_path: /x}\n", "map.yaml:1: default_label: required key is missing"),
        (
            "default_label: a\nimages:\n  a: {backend: libvirt, local_path: /no/such/img}\n",
            "map.yaml:3: images.a.local_path: file /no/such/img does not exist and no source is given to fetch it",
        ),
        (BASE + "aliases:\n  b: c\n  c: b\n", "map.yaml:7: aliases.b: alias cycle: b -> c -> b"),
        (BASE + "aliases:\n  b: nowhere\n", "map.yaml:7: aliases.b: 'nowhere' is neither an image label nor an alias"),
        (BASE + "aliases:\n  a: a\n", "map.yaml:7: aliases.a: an alias must not have the name of an image label"),
        (BASE + "    max_cpus: 1\n    cpus: 2\n", "map.yaml:7: images.a.cpus: default cpus 2 is above max_cpus 1"),
        ("default_label: a\nimages: [\n", "map.yaml:3: not valid YAML"),
        ("- just\n- a list\n", "map.yaml:1: the image map must be a YAML mapping"),
    ],
)
def test_bad_image_map_is_refused_with_file_line_and_key(tmp_path, text, expected):
    with pytest.raises(ImageMapError) as error:
        parse(text, tmp_path)
    assert expected in str(error.value)


def test_missing_file_is_refused_with_its_path(tmp_path):
    with pytest.raises(ImageMapError, match="cannot read the image map"):
        load_image_map(tmp_path / "absent.yaml")


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    with pytest.raises(ImageMapError) as error:
        parse(BASE + "    cpu: 2\n    disk: 3\n", tmp_path)
    assert str(error.value).count("\n") == 1


def test_alias_chain_resolves_and_routing_keys_cover_it(tmp_path):
    image_map = parse(BASE + "aliases:\n  b: a\n  c: b\n  d: c\n", tmp_path)
    assert image_map.resolve("d") == "a"
    assert image_map.routing_keys("a") == ["a", "b", "c", "d", ""]
    with pytest.raises(RequestRejected, match="unknown label 'e'; this fleet knows: a, b, c, d"):
        image_map.resolve("e")


def test_relative_paths_resolve_against_the_map_file(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    image_map = parse(BASE + "    kernel: vmlinuz\n", tmp_path)
    assert image_map.images["a"].kernel == tmp_path / "vmlinuz"


SIZED = """\
default_label: a
sizes:
  small: {cpus: 1, memory_mb: 1024}
  large: {cpus: 4, memory_mb: 4096, disk_gb: 40}
images:
  a:
    backend: noop
    local_path: /x
    size: small
    disk_gb: 10
    max_cpus: 4
    max_memory_mb: 4096
  plain:
    backend: noop
    local_path: /y
"""


def test_resources_merge_image_defaults_then_request_preset_then_explicit(tmp_path):
    image_map = parse(SIZED, tmp_path)
    assert image_map.resources_for("a", request()) == Resources(1, 1024, 10)
    assert image_map.resources_for("a", request(size="large")) == Resources(4, 4096, 40)
    assert image_map.resources_for("a", request(size="large", memory_mb=2048)) == Resources(4, 2048, 40)
    assert image_map.resources_for("plain", request()) == Resources(1, 1024, None)


def test_requests_may_not_exceed_image_caps(tmp_path):
    image_map = parse(SIZED, tmp_path)
    with pytest.raises(RequestRejected, match=r"^cpus: 5 is above image 'a''s cap of 4"):
        image_map.resources_for("a", request(cpus=5))
    with pytest.raises(RequestRejected, match=r"^size: unknown size preset 'xl'; presets: large, small"):
        image_map.resources_for("a", request(size="xl"))


# --- hostile maps: each runs `orchestrator config check` in a child with its address
# space capped, so a regression is a failed assertion, not a swapping test host ---------

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
)  # 10**10 leaves once expanded


def config_check_limited(path: Path, *, address_space: int = 1024**3) -> tuple[int, str, float]:
    import resource
    import subprocess
    import sys
    import time

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        cwd=Path(__file__).resolve().parents[2],
    )
    return done.returncode, done.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LAUGHS + BASE, "aliases expand to more than 100000 nodes"),
        ("default_label: &d [*d]\n" + BASE.split("\n", 1)[1], "an anchor contains an alias to itself"),
        ("default_label: a\nimages: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
        (BASE + "x: " + "9" * 5000 + "\n", "number too long (5000 digits)"),
    ],
    ids=["billion-laughs", "anchor-in-itself", "deep-nesting", "long-number"],
)
def test_hostile_map_is_refused_with_a_line_and_bounded_memory(tmp_path, text, expected):
    path = tmp_path / "map.yaml"
    path.write_text(text)
    code, err, seconds = config_check_limited(path)
    assert code == 2 and err.startswith(f"error: {path}:") and expected in err, err
    assert "Traceback" not in err and seconds < 30


def test_map_above_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "map.yaml"
    with path.open("w") as handle:
        handle.write(BASE)
        handle.write("# filler\n" * (50 * 1024 * 1024 // 9))  # 50 MB: parsing it took minutes
    code, err, seconds = config_check_limited(path)
    assert code == 2 and f"{path}:1: the file is" in err and "above the limit of 1048576" in err, err
    assert seconds < 10


def test_every_file_an_image_names_must_resolve_inside_image_dir(tmp_path):
    from hypervisors.base import BackendName

    image_dir, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    image_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "vmlinuz").write_bytes(b"k")
    (image_dir / "disk.qcow2").write_bytes(b"")
    (image_dir / "initrd").symlink_to(tmp_path / "secret")  # a link that leaves IMAGE_DIR
    (tmp_path / "secret").write_bytes(b"s")
    text = (
        "default_label: a\nimages:\n  a:\n    backend: libvirt\n"
        f"    local_path: {image_dir}/disk.qcow2\n    kernel: {elsewhere}/vmlinuz\n    initrd: {image_dir}/initrd\n"
        "  sim:\n    backend: noop\n    local_path: /anywhere/at/all\n"
    )
    problems = parse(text, tmp_path).path_problems(image_dir=image_dir, default_backend=BackendName.LIBVIRT)
    assert problems == [
        f"map.yaml:6: images.a.kernel: {elsewhere}/vmlinuz is outside IMAGE_DIR {image_dir} "
        "(move the file there, or set IMAGE_DIR to the directory that holds it)",
        f"map.yaml:7: images.a.initrd: {image_dir}/initrd (through a symlink, to {tmp_path}/secret) is outside "
        f"IMAGE_DIR {image_dir} (move the file there, or set IMAGE_DIR to the directory that holds it)",
    ]
    path = tmp_path / "map.yaml"
    path.write_text(text)
    code, err, _ = config_check_limited(path)
    assert code == 2 and "images.a.kernel" in err and "images.a.initrd" in err, err
