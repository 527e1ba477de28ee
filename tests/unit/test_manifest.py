from pathlib import Path

import pytest
import yaml

from fluxstack.errors import UsageError
from fluxstack.manifest import available_manifests, default_manifests_dir, load_manifest, validate_document
from fluxstack.seeder import refuse_unlocked

SHIPPED = available_manifests(default_manifests_dir())


def entry(dest: str, sha: str | None = "a" * 64, size: int | None = 10, repo: str = "org/repo") -> dict:
    return {"repo": repo, "revision": "main", "path": Path(dest).name, "dest": dest, "size": size,
            "sha256": sha, "gated": False, "license": "mit"}


def write(folder: Path, name: str, files: list[dict], include: list[str] | None = None) -> Path:
    doc: dict = {"name": name, "description": "test"}
    if include:
        doc["include"] = include
    doc["files"] = files
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_the_guide_systems_are_shipped() -> None:
    for name in ["flux-dev", "flux-dev-fp8", "flux-schnell", "flux-redux-dev", "flux-kontext-dev-fp8",
                 "flux-realism-lora", "flux-krea-dev", "flux-fill-dev", "flux-canny-dev", "flux-depth-dev"]:
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifests_are_valid(name: str) -> None:
    assert validate_document(default_manifests_dir() / f"{name}.yaml") == []
    load_manifest(name)


def test_flux_dev_matches_the_published_hashes() -> None:
    files = {f.dest: f for f in load_manifest("flux-dev").files}
    assert set(files) == {"diffusion_models/flux1-dev.safetensors", "vae/ae.safetensors",
                          "text_encoders/t5xxl_fp16.safetensors", "text_encoders/clip_l.safetensors"}
    dev = files["diffusion_models/flux1-dev.safetensors"]
    assert dev.size == 23_802_932_552
    assert dev.sha256 == "4610115bb0c89560703c892c59ac2742fa821e60ef5871b33493ba544683abd7"
    assert dev.gated


def test_includes_are_merged_once() -> None:
    redux = load_manifest("flux-redux-dev")
    dests = [f.dest for f in redux.files]
    assert len(dests) == len(set(dests)) == 6
    assert "style_models/flux1-redux-dev.safetensors" in dests
    assert "diffusion_models/flux1-dev.safetensors" in dests


def test_same_bytes_from_two_repos_merge(tmp_path: Path) -> None:
    write(tmp_path, "base", [entry("vae/ae.safetensors", repo="org/one")])
    path = write(tmp_path, "top", [entry("vae/ae.safetensors", repo="org/two")], include=["base"])
    assert len(load_manifest(str(path)).files) == 1


def test_conflicting_dest_names_both_sources(tmp_path: Path) -> None:
    write(tmp_path, "base", [entry("vae/ae.safetensors", sha="a" * 64)])
    path = write(tmp_path, "top", [entry("vae/ae.safetensors", sha="b" * 64)], include=["base"])
    with pytest.raises(UsageError) as err:
        load_manifest(str(path))
    message = str(err.value)
    assert "conflicting entries for vae/ae.safetensors" in message
    assert "base.yaml:" in message and "top.yaml:" in message


def test_schema_error_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "bad", [entry("vae/ok.safetensors"), entry("vae/x.safetensors", sha="NOT-A-HASH")])
    with pytest.raises(UsageError) as err:
        load_manifest(str(path))
    message = str(err.value)
    lines = path.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(lines, 1) if "NOT-A-HASH" in line)
    assert f"bad.yaml:{bad_line}: files/1/sha256" in message


def test_dest_outside_the_model_folders_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "evil", [entry("../etc/passwd")])
    assert any("files/0/dest" in p for p in validate_document(path))
    path = write(tmp_path, "odd", [entry("checkpoints/x.safetensors")])
    assert any("files/0/dest" in p for p in validate_document(path))


def test_name_must_match_file(tmp_path: Path) -> None:
    path = write(tmp_path, "one", [entry("vae/a.safetensors")])
    path.rename(tmp_path / "two.yaml")
    problems = validate_document(tmp_path / "two.yaml")
    assert problems and "must match the file name" in problems[0]


def test_include_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "a", [entry("vae/a.safetensors")], include=["b"])
    write(tmp_path, "b", [entry("vae/b.safetensors")], include=["a"])
    with pytest.raises(UsageError, match="include cycle: a -> b -> a"):
        load_manifest(str(tmp_path / "a.yaml"))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ndescription: x\nfiles:\n  - repo: [unclosed\n")
    with pytest.raises(UsageError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_manifest(str(path))


def test_unknown_manifest_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as err:
        load_manifest("flux-does-not-exist")
    assert "flux-dev" in str(err.value)


def test_unlocked_entries_are_refused_with_the_lock_command() -> None:
    manifest = load_manifest("flux-realism-lora")
    with pytest.raises(UsageError) as err:
        refuse_unlocked(manifest)
    message = str(err.value)
    assert "loras/flux-realism-lora.safetensors" in message
    assert "fluxstack manifest lock flux-realism-lora" in message
