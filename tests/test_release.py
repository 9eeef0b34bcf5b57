"""Release packages (exact counts, manifest, verify, dataset card) and the status view."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from mlds.zoo.release import DATASETS, ReleaseError, build_package, dataset_card, verify_package, zoo_status
from mlds.zoo.store import ZooStore, read_shard, sha256_file
from test_store import write

REPO = Path(__file__).resolve().parent.parent
TASKS = DATASETS["ds1"].tasks


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"mlds_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_zoo(tmp_path_factory):
    """120 networks per DS1 task (parity lacks seed 7, so has 119), plus identical duplicates."""
    root = tmp_path_factory.mktemp("zoo") / "zoo"
    store = ZooStore(root)
    for task in TASKS:
        for lo in (0, 50, 100):
            seeds = [s for s in range(lo, min(lo + 50, 120)) if not (task == "parity" and s == 7)]
            write(store, task, seeds)
    write(store, "parity", [10, 11, 12])  # stored twice: kept once
    return root


@pytest.fixture
def zoo(base_zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(base_zoo, root)
    return root


def test_package_holds_exactly_n_lowest_seeds_per_task(zoo, tmp_path):
    out = tmp_path / "releases"
    package = build_package(zoo, "ds1", 100, out)
    assert package == out / "MLDS-DS1-100"
    assert sorted(p.name for p in out.iterdir()) == ["MLDS-DS1-100"]  # no work folder left
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["networks"] == 500 and manifest["networks_per_task"] == 100
    seen = {}
    for shard in manifest["shards"]:
        for net in read_shard(package / shard["path"]):
            seen.setdefault(net.meta["task"], []).append(net.meta["seed"])
    assert sorted(seen) == sorted(TASKS)
    for task in TASKS:
        expected = [s for s in range(101) if s != 7][:100] if task == "parity" else list(range(100))
        assert seen[task] == expected, task  # exactly N, the lowest seeds, each once, in order
        assert manifest["tasks"][task]["networks"] == 100
        assert manifest["tasks"][task]["converged"] == sum(s % 2 == 0 for s in expected)
    assert manifest["tasks"]["parity"]["seeds"] == [0, 100] and not manifest["tasks"]["parity"]["contiguous_seeds"]
    for shard in manifest["shards"]:
        assert sha256_file(package / shard["path"]) == shard["sha256"]
    sums = (package / "SHA256SUMS").read_text().splitlines()
    assert sorted(sums) == sorted(f"{s['sha256']}  {s['path']}" for s in manifest["shards"])
    report = verify_package(package)
    assert report.ok, report.problems
    assert report.networks == 500


def test_dataset_card(zoo, tmp_path):
    card = (build_package(zoo, "ds1", 100, tmp_path) / "README.md").read_text()
    for needle in ("# MLDS-DS1-100", "## Contents", "500 trained networks: exactly 100 per task for 5 tasks",
                   "## Architecture", "4,364 parameters", "`rnn.weight_ih_l0` | [24, 9]", "## Training protocol",
                   "## How to load", "ZooDataset(", "wds.WebDataset(", "## Citation", "TBD", "## Licence",
                   "CC-BY-4.0", "license: cc-by-4.0", "| parity | 100 | 0–100 (not contiguous) | 51 (51%) |",
                   "| single_direct | 100 | 0–99 | 50 (50%) |", "median test acc"):
        assert needle in card, needle
    card = (build_package(zoo, "ds1", 100, tmp_path, force=True, license="MIT", citation="@misc{mlds}")
            / "README.md").read_text()
    assert "@misc{mlds}" in card and "license: mit" in card



def test_dataset_card_template_sections_and_edge_cases():
    """The card from its template: every section, the trigger split, settings that differ between tasks,
    an architecture this version cannot build; no template syntax left over, one trailing newline."""
    metrics = {"test": {"median_acc": 0.99512, "min_acc": None, "median_loss": 0.012345},
               "test_trigger": {"median_acc": 0.875, "min_acc": 0.0, "median_loss": 1.0}}
    tasks = {t: {"networks": 2000, "converged": 1000, "seeds": [0, 1999], "contiguous_seeds": True,
                 "median_epochs": 12.5, "metrics": metrics, "recipes": {f"r{i}{t}": 1 for i in range(3)}}
             for t in ("a", "b")}
    manifest = {"name": "MLDS-DS1-2000", "dataset": "ds1", "networks_per_task": 2000, "networks": 4000,
                "tasks": tasks, "architecture": {"name": "odd", "param_count": 99}, "shards": [{}] * 3,
                "bytes": 2_500_000, "license": "MIT", "citation": "@misc{mlds}", "created": "2024-01-02T03:04:05",
                "created_by": "mlds 0.1.0", "code_revisions": ["abc", "def"]}
    metas = {"a": {"config": {"optim": {"lr": 0.01}, "train": {"batch_size": 64}}},
             "b": {"config": {"optim": {"lr": 0.02}, "train": {"batch_size": 64}}}}
    card = dataset_card(manifest, {}, metas)
    sections = [line for line in card.splitlines() if line.startswith("#")]
    assert sections == ["# MLDS-DS1-2000", "## Contents", "## Architecture", "## Training protocol", "## How to load",
                        "## Citation", "## Licence"]
    for needle in ("license: mit\nsize_categories: 1K<n<10K\n", "- 4,000 trained networks: exactly 2,000 per task",
                   "- 3 WebDataset shards in `shards/` (2.5 MB)",
                   "| median epochs | median test acc | min test acc | median test_trigger acc | min test_trigger acc | "
                   "median test loss |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
                   "| a | 2,000 | 0–1999 | 1,000 (50%) | 12.5 | 0.995 | – | 0.875 | 0 | 0.0123 |\n",
                   "(50.0%). Accuracy is per step", "`test_trigger` is the share of the steps",
                   "`odd`: GRU 4 layers + 4 linear, 99 parameters (as PyTorch counts them). \n\n## Training protocol",
                   "- learning rate: differs between tasks (see meta.json)\n- batch size: 64\n- recipes",
                   ": 6 (r0a, r0b, r1a, r1b, r2a, ...)\n- code revision: abc, def\n",
                   'ZooDataset("MLDS-DS1-2000", tasks=["a"]', "## Citation\n\n@misc{mlds}\n",
                   "\n\nGenerated by mlds 0.1.0 on 2024-01-02T03:04:05.\n"):
        assert needle in card, needle
    assert "Flat vector layout" not in card and "{{" not in card and "{%" not in card
    assert card.endswith(".\n") and not card.endswith("\n\n")

def test_rebuilding_gives_byte_identical_shards(zoo, tmp_path):
    a = json.loads((build_package(zoo, "ds1", 100, tmp_path / "a", shard_networks=30) / "manifest.json").read_text())
    b = json.loads((build_package(zoo, "ds1", 100, tmp_path / "b", shard_networks=30) / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert len(a["shards"]) == 5 * 4 and max(s["networks"] for s in a["shards"]) == 30
    with pytest.raises(ReleaseError, match="exists"):
        build_package(zoo, "ds1", 100, tmp_path / "a")


def test_not_enough_networks_says_how_many_are_missing(zoo, tmp_path, capsys):
    with pytest.raises(ReleaseError) as err:
        build_package(zoo, "ds1", 500, tmp_path)
    text = str(err.value)
    assert "MLDS-DS1-500" in text and f"{4 * 380 + 381} networks are missing" in text
    assert "parity: 119/500 stored, 381 missing" in text
    assert not (tmp_path / "MLDS-DS1-500").exists()
    package = script("package")
    assert package.main(["build", "ds1", "500", "--root", str(zoo), "--out", str(tmp_path), "--quiet"]) == 1
    assert "381 missing" in capsys.readouterr().err


def test_scripts_refuse_bad_arguments_clearly(zoo, tmp_path, capsys):
    package, status = script("package"), script("status")
    assert package.main(["build", "ds9", "100", "--root", str(zoo)]) == 2
    assert "unknown dataset 'ds9'" in capsys.readouterr().err
    assert package.main(["build", "MLDS-DS1-200", "--root", str(zoo)]) == 2
    assert "200 is not a release size of ds1; sizes (networks per task): 100, 500, 1000, 5000, 10000" in \
        capsys.readouterr().err
    assert package.main(["build", "ds3", "500", "--root", str(zoo)]) == 2
    assert package.main(["verify", str(tmp_path / "nothing")]) == 1
    assert status.main(["--root", str(tmp_path / "nothing")]) == 2
    for module, argv in ((package, ["--help"]), (package, ["build", "--help"]), (status, ["--help"])):
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code == 0


def test_verify_finds_damaged_missing_and_extra_shards(zoo, tmp_path, capsys):
    package = build_package(zoo, "ds1", 100, tmp_path, shard_networks=50)
    manifest = json.loads((package / "manifest.json").read_text())
    shards = [package / s["path"] for s in manifest["shards"]]
    # flip one byte inside a weights file
    data = bytearray(shards[0].read_bytes())
    data[20000] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:30000])  # truncated
    shards[2].unlink()  # missing
    shutil.copy(shards[3], package / "shards" / "stray.tar")  # not in the manifest
    report = verify_package(package)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{manifest['shards'][0]['path']}: SHA-256 differs" in text
    assert "do not match their SHA-256" in text  # the sample itself is found bad too
    assert f"{shards[1]}: corrupt shard at byte offset" in text
    assert f"{manifest['shards'][2]['path']}: missing" in text
    assert "shards/stray.tar: shard not listed" in text
    assert "the release needs exactly 100" in text
    assert script("package").main(["verify", str(package), "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_conflicting_versions_are_refused(zoo, tmp_path):
    write(ZooStore(zoo), "eight_bit", [42], salt=1)
    with pytest.raises(ReleaseError, match="ds1-eight_bit-000042"):
        build_package(zoo, "ds1", 100, tmp_path)
    package = build_package(zoo, "ds1", 100, tmp_path, on_conflict="first")
    assert verify_package(package).ok
    status = zoo_status(zoo, ["ds1"])
    assert list(status.conflicts) == ["ds1-eight_bit-000042"]


def test_mixed_recipes_are_refused(zoo, tmp_path):
    for shard in ZooStore(zoo).shards("ds1", "simple_xor")[:1]:
        shard.unlink()
    write(ZooStore(zoo), "simple_xor", range(0, 50), recipe="new")
    with pytest.raises(ReleaseError, match="mix training recipes"):
        build_package(zoo, "ds1", 100, tmp_path)
    assert verify_package(build_package(zoo, "ds1", 100, tmp_path, allow_mixed_recipes=True)).ok
    # choosing the old recipe: simple_xor lacks seeds 0..49 of it; the other tasks are unaffected
    with pytest.raises(ReleaseError, match="simple_xor: 70/100 stored, 30 missing"):
        build_package(zoo, "ds1", 100, tmp_path / "old", recipes={"rcp"})
    write(ZooStore(zoo), "simple_xor", range(0, 50), recipe="rcp")
    package = build_package(zoo, "ds1", 100, tmp_path / "old", recipes={"rcp"})
    manifest = json.loads((package / "manifest.json").read_text())
    assert all(t["recipes"] == {"rcp": 100} for t in manifest["tasks"].values())


def test_corrupt_store_shards_are_not_counted(zoo, tmp_path, capsys):
    store = ZooStore(zoo)
    bad = store.shards("ds1", "single_invert")[0]  # seeds 0..49
    bad.write_bytes(bad.read_bytes()[:-9000])
    status = zoo_status(zoo, ["ds1"])
    assert [str(e.path) for e in status.corrupt] == [str(bad)]
    counts = {t.task: t.stored for t in status.datasets[0].tasks}
    assert counts["single_invert"] == 70 and counts["single_direct"] == 120 and counts["parity"] == 119
    with pytest.raises(ReleaseError) as err:  # refused: its networks would be replaced by other seeds
        build_package(zoo, "ds1", 100, tmp_path)
    assert "1 corrupt shard(s)" in str(err.value) and str(bad) in str(err.value)
    assert "status.py" in str(err.value) and "--verify --quarantine" in str(err.value) and "--skip-corrupt" in str(err.value)
    with pytest.raises(ReleaseError) as err:  # skipped: then the task is short
        build_package(zoo, "ds1", 100, tmp_path, skip_corrupt=True)
    assert "single_invert: 70/100 stored, 30 missing" in str(err.value) and "corrupt" in str(err.value)
    assert not list(tmp_path.glob("MLDS-*")) and not list(tmp_path.glob(".MLDS-*"))
    status_script = script("status")
    assert status_script.main(["--root", str(zoo), "--dataset", "ds1", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["datasets"]["ds1"]["tasks"]["single_invert"]["stored"] == 70
    assert "byte offset" in report["corrupt"][0]
    assert status_script.main(["--root", str(zoo), "--dataset", "ds1", "--quarantine", "--json"]) == 1
    capsys.readouterr()
    assert status_script.main(["--root", str(zoo), "--dataset", "ds1", "--json"]) == 0  # moved aside


def test_status_tables(zoo, tmp_path, capsys):
    status = script("status")
    build_package(zoo, "ds1", 100, tmp_path / "rel")
    assert status.main(["--root", str(zoo), "--dataset", "ds1", "--markdown", "--releases", str(tmp_path / "rel")]) == 0
    out = capsys.readouterr().out
    assert "Status | MLDS-DS1-100 | MLDS-DS1-500 | MLDS-DS1-1000 | MLDS-DS1-5000 | MLDS-DS1-10000 |" in out
    assert f"Computation | Complete | {4 * 120 + 119}/2500 | 599/5000 | 599/25000 | 599/50000 |" in out
    assert f"Package | {tmp_path / 'rel' / 'MLDS-DS1-100'} | --- |" in out
    assert "| parity | 119 | 60 (50%) | rcp x119 | 0 |" in out
    assert "3 duplicate copies kept once" in out
    assert status.main(["--root", str(zoo)]) == 0  # rich tables of every dataset
    out = capsys.readouterr().out
    assert "MLDS-DS3-100" in out and "0/10000" in out and "MLDS-DS4-10000" in out and "Complete" in out


# --------------------------------------------------------------------------- faults and hostile packages (issue 15)

@pytest.fixture(scope="module")
def built(base_zoo, tmp_path_factory):
    return build_package(base_zoo, "ds1", 100, tmp_path_factory.mktemp("built"), shard_networks=50)


@pytest.fixture
def package(built, tmp_path):
    copy = tmp_path / "pkg" / built.name
    shutil.copytree(built, copy)
    return copy


def test_build_with_a_corrupt_shard_refuses_unless_told_and_records_what_it_skipped(zoo, tmp_path, capsys):
    bad = ZooStore(zoo).shards("ds1", "single_invert")[-1]  # seeds 100..119: not needed for 100 per task
    bad.write_bytes(bad.read_bytes()[:5000])
    before = sorted(p.name for p in ZooStore(zoo).shards())
    cli = script("package")
    argv = ["build", "ds1", "100", "--root", str(zoo), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 corrupt shard(s) of ds1") and str(bad) in err and "Traceback" not in err
    assert "status.py --root" in err and "--verify --quarantine" in err and "--skip-corrupt" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert cli.main(argv + ["--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"skipped corrupt shard ds1/single_invert/{bad.name}" in out
    manifest = json.loads((tmp_path / "out" / "MLDS-DS1-100" / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["skipped_corrupt"]] == [f"ds1/single_invert/{bad.name}"]
    assert manifest["tasks"]["single_invert"]["seeds"] == [0, 99]
    assert verify_package(tmp_path / "out" / "MLDS-DS1-100").ok
    assert sorted(p.name for p in ZooStore(zoo).shards()) == before and bad.stat().st_size == 5000


def test_damage_found_while_building_is_one_error_line_and_leaves_nothing(zoo, tmp_path, capsys):
    import os
    from mlds.zoo.release import build_package as build
    ZooStore(zoo).index("ds1")  # indexed and cached while sound
    shard = ZooStore(zoo).shards("ds1", "parity")[0]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[20000] ^= 0xFF  # inside a weights file; size and mtime kept: the cached index still trusts it
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ReleaseError, match="damaged.*do not match their SHA-256") as err:
        build(zoo, "ds1", 100, tmp_path / "out")
    assert "--verify --quarantine" in str(err.value) and list((tmp_path / "out").iterdir()) == []
    assert script("package").main(["build", "ds1", "100", "--root", str(zoo), "--out", str(tmp_path / "out"),
                                   "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a shard of the store is damaged") and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_full_disk_while_building_is_one_error_line_and_leaves_nothing(zoo, tmp_path, monkeypatch, capsys):
    import errno
    import mlds.zoo.release as release_module
    real = release_module.write_tar
    calls = []

    def full(path, samples, mtime=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, samples, mtime=mtime)

    monkeypatch.setattr(release_module, "write_tar", full)
    assert script("package").main(["build", "ds1", "100", "--root", str(zoo), "--out", str(tmp_path / "out"),
                                   "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build") and "No space left on device" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("path", ["../../outside.tar", "ABSOLUTE", "shards/../../outside.tar", "shards/link.tar"])
def test_manifest_shard_paths_must_stay_inside_the_package(package, tmp_path, path, capsys):
    from mlds.zoo.reader import ZooDataset, shard_paths
    manifest = json.loads((package / "manifest.json").read_text())
    outside = tmp_path / "outside.tar"
    shutil.copy(package / manifest["shards"][0]["path"], outside)
    if path == "ABSOLUTE":
        path = str(outside)
    if path == "shards/link.tar":
        (package / manifest["shards"][0]["path"]).unlink()
        (package / path).symlink_to(outside)
    manifest["shards"][0]["path"] = path
    (package / "manifest.json").write_text(json.dumps(manifest))
    report = verify_package(package)
    assert not report.ok and any("manifest.json: shard path" in p for p in report.problems), report.problems
    assert report.networks == 450  # the outside shard was not read
    with pytest.raises(ValueError, match="not a relative path inside|leads outside"):
        shard_paths(package)
    with pytest.raises(ValueError):
        ZooDataset(package)
    assert script("package").main(["verify", str(package), "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("manifest, words", [
    ([1, 2, 3], "not a JSON object but a list"),
    ({"format": "mlds-release/1"}, "lacks 'dataset'"),
    ("DROP shards", "lacks 'shards'"),
    ("DROP shards.0.path", "shards[0] lacks 'path'"),
    ("SET shards.0.bytes=x", "shards[0].bytes is not an integer"),
    ("SET tasks={}", None),
    ("SET tasks.parity=7", "tasks.parity is not an object"),
    ("SET networks_per_task=null", "'networks_per_task' is not an integer"),
])
def test_malformed_manifests_are_a_failed_report(package, manifest, words, capsys):
    if isinstance(manifest, str):  # "DROP a.0.b" or "SET a.0.b=<json or a bare string>" on the real manifest
        real = json.loads((package / "manifest.json").read_text())
        op, what = manifest.split(" ", 1)
        keys, _, value = what.partition("=")
        *parents, leaf = keys.split(".")
        target = real
        for k in parents:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if op == "DROP":
            del target[leaf]
        else:
            try:
                target[leaf] = json.loads(value)
            except ValueError:
                target[leaf] = value
        manifest = real
    (package / "manifest.json").write_text(json.dumps(manifest))
    report = verify_package(package)
    assert not report.ok
    if words:
        assert any(words in p for p in report.problems), report.problems
    assert script("package").main(["verify", str(package), "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("change, words", [("rename", "missing ['head.0.weight']"),
                                           ("reshape", "rnn.weight_hh_l0 has shape (8, 24)")])
def test_weights_that_do_not_fit_the_architecture_fail_verify(package, change, words):
    import tarfile
    from safetensors.torch import load, save
    from mlds.zoo.store import sha256_bytes, write_tar
    manifest = json.loads((package / "manifest.json").read_text())
    shard = package / manifest["shards"][0]["path"]
    samples, sample = [], {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if sample and sample["__key__"] != key:
                samples.append(sample)
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(m).read()
    samples.append(sample)
    weights = load(samples[0]["weights.safetensors"])
    if change == "rename":
        weights["head.0.weightx"] = weights.pop("head.0.weight")
    else:
        weights["rnn.weight_hh_l0"] = weights["rnn.weight_hh_l0"].t().contiguous()
    blob = save(weights)
    meta = json.loads(samples[0]["meta.json"])
    meta["weights_sha256"] = sha256_bytes(blob)
    samples[0].update({"weights.safetensors": blob, "meta.json": json.dumps(meta, sort_keys=True).encode()})
    shard.unlink()
    write_tar(shard, samples, mtime=0)
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (package / "manifest.json").write_text(json.dumps(manifest))
    report = verify_package(package)
    assert len(report.problems) == 1 and "do not fit the architecture" in report.problems[0]
    assert words in report.problems[0], report.problems
