"""programs/publish.py against a fake Hub on localhost (``hub_server``): what arrives is exactly the folder, byte
for byte, on the right repository, branch and visibility; refusals happen before any request.

``huggingface_hub`` reads ``HF_ENDPOINT`` at import, so the tests point ``constants.ENDPOINT`` at the fake Hub.
Xet storage is switched off (``HF_HUB_DISABLE_XET``): its protocol talks to a separate content-addressed store
that the fake does not speak, so binary files go through the Git LFS batch API instead.
"""

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
import transformers

from tests.integration import finetune_fixtures
from tests.integration.hub_server import FakeHub
from tests.integration.programs import run_program
from tests.integration.test_finetune_programs import run
from zmaj.publish import dataset
from zmaj.publish.export import export_model
from zmaj.tasks import get_task


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        yield fake


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported Llama: config, safetensors, tokenizer, generation config, card."""
    root = tmp_path_factory.mktemp("publish")
    model = finetune_fixtures.tiny_model(root / "model")
    return export_model(model, root / "tiny", license="mit")


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_sends_exactly_the_folder_to_a_private_branch(hub: FakeHub, folder: Path) -> None:
    code, _, err = run(
        "publish.py", folder, "--repo-id", "me/tiny", "--private", "--revision", "v1", "--message", "first"
    )
    assert code == 0, err
    repo = hub.repos["me/tiny"]
    assert (repo.type, repo.private) == ("model", True)
    assert hub.files("me/tiny", "v1") == local_files(folder)
    assert hub.files("me/tiny", "main") == {}
    weights = (folder / "model.safetensors").read_bytes()
    assert weights in hub.lfs.values()  # the binary file went through LFS, the text inline
    commits = [r for r in hub.requests if "/commit/" in r.path]
    assert [c.path for c in commits] == ["/api/models/me/tiny/commit/v1"]
    header = json.loads(commits[0].body.splitlines()[0])
    assert header["value"]["summary"] == "first"
    assert any(r.path == "/api/validate-yaml" for r in hub.requests)


def test_a_second_upload_to_an_existing_public_repo(hub: FakeHub, folder: Path) -> None:
    for _ in range(2):
        code, _, err = run("publish.py", folder, "--repo-id", "me/tiny")
        assert code == 0, err
    assert hub.repos["me/tiny"].private is False
    creates = [r.json() for r in hub.requests if r.path == "/api/repos/create"]
    assert len(creates) == 2
    assert all("visibility" not in c for c in creates)
    assert hub.files("me/tiny") == local_files(folder)
    # --private cannot make it private: refused, rather than uploaded in public.
    code, _, err = run("publish.py", folder, "--repo-id", "me/tiny", "--private")
    assert code == 2, err
    assert "--private: me/tiny exists and is public" in err
    assert len([r for r in hub.requests if "/commit/" in r.path]) == 2


def test_a_second_upload_to_the_same_branch_is_committed_to_it(hub: FakeHub, folder: Path) -> None:
    """--revision creates the branch only where it is missing: a new version uploaded to v1 again finds it there
    and goes into it. Without --message the commit is named after the folder."""
    for _ in range(2):
        code, _, err = run("publish.py", folder, "--repo-id", "me/tiny", "--revision", "v1")
        assert code == 0, err
    commits = [r for r in hub.requests if "/commit/" in r.path]
    assert [c.path for c in commits] == ["/api/models/me/tiny/commit/v1"] * 2
    assert hub.files("me/tiny", "v1") == local_files(folder)
    header = json.loads(commits[-1].body.splitlines()[0])
    assert header["value"]["summary"] == f"Upload {folder.name} with zmaj"


def test_private_asks_about_the_dataset_repository(hub: FakeHub, tmp_path: Path) -> None:
    """The Hub keeps a model me/arith and a dataset me/arith apart: --private on a dataset asks whether the
    dataset repository is private (a model's lookup is not found, or finds another repository)."""
    args: list[str | Path] = ["--n-train", "3", "--n-test", "2", "--out", tmp_path / "arith"]
    code, _, err = run(
        "publish.py", "--dataset", "task:arithmetic", *args, "--repo-id", "me/arith", "--private"
    )
    assert code == 0, err
    assert (hub.repos["me/arith"].type, hub.repos["me/arith"].private) == ("dataset", True)
    assert not any(r.path.startswith("/api/models/") for r in hub.requests)  # no model was asked about


def test_an_upload_replaces_what_the_repo_held(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    """A file of an earlier upload that the folder no longer has goes in the same commit: a single
    model.safetensors left beside new shards is what transformers would load."""
    shutil.copytree(folder, tmp_path / "again")
    (tmp_path / "again" / "old-notes.txt").write_text("from the first upload")
    code, _, err = run("publish.py", tmp_path / "again", "--repo-id", "me/tiny")
    assert code == 0, err
    (tmp_path / "again" / "old-notes.txt").unlink()
    code, _, err = run("publish.py", tmp_path / "again", "--repo-id", "me/tiny")
    assert code == 0, err
    assert hub.files("me/tiny") == local_files(folder)


def test_dry_run_lists_files_and_card_and_contacts_nothing(
    hub: FakeHub, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    code, out, err = run("publish.py", folder, "--repo-id", "me/tiny", "--dry-run")
    assert code == 0, err
    for path, data in local_files(folder).items():
        assert f"{len(data):>14,}  {path}" in out
    assert (folder / "README.md").read_text() in out
    assert hub.requests == []


def test_the_cards_snippet_loads_the_repository_it_is_published_to(
    hub: FakeHub, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exported with a placeholder (or for another repository), the card told readers of alice/other to load
    USER/tiny: the dry run shows the snippet as it will be uploaded, and the upload sends it, and keeps it."""
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    exported = (copy / "README.md").read_text()
    [named] = {line for line in exported.splitlines() if "from_pretrained" in line and "tokenizer" in line}
    code, out, err = run("publish.py", copy, "--repo-id", "alice/other", "--dry-run")
    assert code == 0, err
    assert 'AutoModelForCausalLM.from_pretrained("alice/other")' in out
    assert 'AutoTokenizer.from_pretrained("alice/other")' in out
    assert (copy / "README.md").read_text() == exported  # a dry run changes nothing
    shown = out[out.index("---\n") :]  # the card, printed after the file list
    assert (
        f"{len(shown.encode()) - 1:>14,}  README.md" in out
    )  # the size of the card sent (print adds a newline)
    assert named not in out
    code, _, err = run("publish.py", copy, "--repo-id", "alice/other")
    assert code == 0, err
    uploaded = hub.files("alice/other")["README.md"].decode()
    assert uploaded == (copy / "README.md").read_text()
    assert uploaded.count('from_pretrained("alice/other")') == 2
    assert [line for line in uploaded.splitlines() if "alice/other" not in line] == [
        line for line in exported.splitlines() if "from_pretrained" not in line
    ]


def test_no_token_exits_2_before_any_request(
    hub: FakeHub, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run("publish.py", folder, "--repo-id", "me/tiny")
    assert code == 2
    assert "HF_TOKEN" in err
    assert hub.requests == []


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("tokenizer.json", "tokenizer.json"),
        ("model.safetensors", "no weights"),
        ("README.md", "README.md"),
        ("config", "transformers cannot read it"),
        pytest.param(  # "hidden_size": "64", a type transformers checks from version 5 on
            "config field",
            "transformers cannot read it",
            marks=pytest.mark.skipif(
                int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4 checks no field types"
            ),
        ),
        ("license", "no license"),
        # The Hub refuses the commit, after the repository was created: "license" must be one of [...].
        ("license text", "README.md: the card's license 'MIT License' is not a license id the Hub accepts"),
        (
            "license list",
            "README.md: the card's license ['mit', 'apache-2.0'] is not a license id",
        ),  # a TypeError
        ("card bytes", "README.md: not UTF-8 text (byte 0xff at offset 3)"),
        ("card yaml", "README.md: the card's metadata cannot be read"),
        ("index", "model.safetensors.index.json: not a shard index"),
        # A copy cut short would upload, and from_pretrained fail on the Hub's copy.
        ("cut weights", "model.safetensors: not a whole safetensors file"),
        ("tokenizer text", "tokenizer.json is not a tokenizer file: not JSON"),
    ],
)
def test_a_broken_folder_exits_2_before_any_request(
    hub: FakeHub, folder: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    if breakage == "config":
        (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    elif breakage == "config field":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps(config | {"hidden_size": str(config["hidden_size"])}))
    elif breakage == "card bytes":
        (broken / "README.md").write_bytes(b"---\xff\n")
    elif breakage == "card yaml":
        (broken / "README.md").write_text("---\ntags: [zmaj\n---\n")
    elif breakage == "index":
        (broken / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif breakage == "cut weights":
        os.truncate(broken / "model.safetensors", (broken / "model.safetensors").stat().st_size - 1)
    elif breakage == "tokenizer text":
        (broken / "tokenizer.json").write_text("{")
    elif breakage.startswith("license"):
        card = (broken / "README.md").read_text()
        replacement = {"license": "", "license text": "license: MIT License\n"}.get(
            breakage, "license:\n- mit\n- apache-2.0\n"
        )
        (broken / "README.md").write_text(card.replace("license: mit\n", replacement))
    else:
        (broken / breakage).unlink()
    code, _, err = run("publish.py", broken, "--repo-id", "me/tiny")
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert message in errors[0], err
    assert hub.requests == []


def test_a_shard_cut_short_exits_2_before_any_request(hub: FakeHub, tmp_path: Path) -> None:
    """Every shard's header is read, not the first or a single file's only."""
    model = finetune_fixtures.tiny_model(tmp_path / "model")
    sharded = export_model(model, tmp_path / "sharded", license="mit", max_shard_bytes=20_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    os.truncate(shards[-1], shards[-1].stat().st_size - 1)
    code, _, err = run("publish.py", sharded, "--repo-id", "me/tiny")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert f"{shards[-1]}: not a whole safetensors file" in errors[0]
    assert hub.requests == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "task:arithmetic", "--repo-id", "a/b/c"], "--repo-id"),
        (["--dataset", "task:arithmetic", "--n-train", "-5"], "--n-train"),
        (
            ["--dataset", "task:arithmetic", "--license", " "],
            "--license: ' ': not a license id the Hub accepts",
        ),
        # The Hub refuses a card whose license is not one of its ids, after the repository was created.
        (
            ["--dataset", "task:arithmetic", "--license", "MIT License"],
            "'MIT License': not a license id the Hub",
        ),
        # A corpus's tokens are under the corpus's license, which zmaj cannot know.
        (["--dataset", "tokens:x"], "--dataset tokens: needs --license"),
        # random.Random(-3) is random.Random(3): seed 3's problems under another name.
        (["--dataset", "task:arithmetic", "--seed", "-3"], "--seed: expected a whole number from 0"),
        # A flag the source does not read would be ignored in silence.
        (
            ["FOLDER", "--n-train", "5", "--license", "mit"],
            "--n-train, --license cannot be used with a model",
        ),
        (["FOLDER", "--out", "x"], "--out cannot be used with a model FOLDER"),
        # Both sources at once: the dataset was published, and FOLDER ignored in silence.
        (["FOLDER", "--dataset", "task:arithmetic"], "give a model FOLDER or --dataset SOURCE (one of them)"),
        (["--dataset", "tokens:x", "--set-task", "a=1", "--seed", "1"], "--set-task, --seed cannot be used"),
    ],
)
def test_bad_flags_exit_2_before_anything_is_built(
    hub: FakeHub, folder: Path, flags: list[str], message: str
) -> None:
    flags = [str(folder) if flag == "FOLDER" else flag for flag in flags]
    result = run_program("publish.py", "--repo-id", "me/a", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert hub.requests == []


def test_a_task_dataset_arrives_as_the_folder_and_loads_with_datasets(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "arith"
    args: list[str | Path] = ["--set-task", "digits=1", "--n-train", "20", "--n-test", "5", "--out", out]
    code, _, err = run("publish.py", "--dataset", "task:arithmetic", *args, "--repo-id", "me/arith")
    assert code == 0, err
    assert hub.repos["me/arith"].type == "dataset"
    assert hub.files("me/arith") == local_files(out)
    assert [r.path for r in hub.requests if "/commit/" in r.path] == ["/api/datasets/me/arith/commit/main"]
    loaded = datasets.load_dataset(str(out))
    task = get_task("arithmetic", digits=1)
    for split, n in (("train", 20), ("test", 5)):
        problems = task.problems(split, n, 0)  # type: ignore[arg-type]
        assert loaded[split]["prompt"] == [p.prompt for p in problems]
        assert loaded[split]["answer"] == [p.answer for p in problems]
        assert loaded[split][0]["messages"] == [
            {"role": "user", "content": problems[0].prompt},
            {"role": "assistant", "content": problems[0].solution},
        ]


def token_file(directory: Path, split: str, documents: list[list[int]]) -> Path:
    """A token file as ``zmaj.data.tokens.tokenize_splits`` lays it out."""
    directory.mkdir()
    np.asarray([t for d in documents for t in d], dtype=np.uint16).tofile(directory / "tokens.bin")
    np.save(directory / "offsets.npy", np.cumsum([0, *map(len, documents)]).astype(np.int64))
    meta = {"dtype": "uint16", "n_tokens": sum(map(len, documents)), "vocab_size": 300, "eos_id": 1}
    (directory / "meta.json").write_text(json.dumps(meta | {"pad_id": 0, "split": split}))
    return directory


def test_token_files_arrive_as_documents(hub: FakeHub, tmp_path: Path) -> None:
    train_docs, validation_docs = [[5, 6, 7, 1], [8, 1]], [[9, 9, 1]]
    train = token_file(tmp_path / "train-abc", "train", train_docs)
    validation = token_file(tmp_path / "validation-def", "validation", validation_docs)
    out = tmp_path / "tokens"
    source = f"tokens:{train},{validation}"
    flags = ["--out", out, "--repo-id", "me/tok", "--private", "--license", "other"]
    code, _, err = run("publish.py", "--dataset", source, *flags)
    assert code == 0, err
    assert hub.repos["me/tok"].private
    assert hub.files("me/tok") == local_files(out)
    loaded = datasets.load_dataset(str(out))
    assert loaded["train"]["input_ids"] == train_docs
    assert loaded["validation"]["input_ids"] == validation_docs


def test_dataset_dry_run_and_bad_sources(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    task = [
        "--dataset",
        "task:arithmetic",
        "--n-train",
        "3",
        "--n-test",
        "2",
        "--repo-id",
        "me/arith-2",
        "--dry-run",
    ]
    code, out, err = run("publish.py", *task)
    assert code == 0, err
    assert "\n# arith-2\n" in out  # the card is titled with the dataset's name, not its owner's
    assert "data/train-00000-of-00001.parquet" in out
    assert "config_name: default" in out
    assert "license: apache-2.0" in out  # the documented default of --license
    for source, message in [
        ("task:no-such-task", "no-such-task"),
        ("words:x", "task:NAME"),
        (f"tokens:{tmp_path}", "meta.json"),
    ]:
        code, _, err = run("publish.py", "--dataset", source, "--repo-id", "me/a", "--license", "mit")
        assert code == 2, err
        assert message in err
    # --out replaces its folder whole: one that holds the token files is refused, and they stay.
    tokens = tmp_path / "corpus" / "tokens"
    tokens.mkdir(parents=True)
    (tokens / "meta.json").write_text("{}")
    code, _, err = run(
        "publish.py",
        "--dataset",
        f"tokens:{tokens}",
        "--out",
        tmp_path / "corpus",
        "--repo-id",
        "me/a",
        "--license",
        "mit",
    )
    assert code == 2, err
    assert "holds the source" in err
    assert (tokens / "meta.json").read_text() == "{}"
    # So is a folder of other files (it was replaced, even with --dry-run), and the current folder.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    code, _, err = run("publish.py", *task, "--out", tmp_path / "precious")
    assert code == 2, err
    assert "holds files a dataset folder does not" in err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
    # A project of its own that happens to hold a README.md and a data/ folder was replaced too.
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "README.md").write_text("# my project\n")
    (project / "data" / "measurements.csv").write_text("precious,1\n")
    code, _, err = run("publish.py", *task, "--out", project, "--dry-run")
    assert code == 2, err
    assert "holds files a dataset folder does not" in err
    assert (project / "data" / "measurements.csv").read_text() == "precious,1\n"
    assert (project / "README.md").read_text() == "# my project\n"
    for extra in ("data/measurements.csv", "data"):  # a README.md beside an empty data/, and one alone
        target = project / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        code, _, err = run("publish.py", *task, "--out", project, "--dry-run")
        assert code == 2, err
        assert (project / "README.md").read_text() == "# my project\n"
    monkeypatch.chdir(tmp_path / "precious")
    code, _, err = run("publish.py", *task, "--out", ".")
    assert code == 2, err
    assert "is the current folder or holds it" in err
    for _ in range(2):  # the second time, a folder this program wrote: replaced
        code, _, err = run("publish.py", *task, "--out", tmp_path / "written")
        assert code == 0, err
    assert hub.requests == []


def test_an_unreachable_hub_and_a_full_disk_are_one_line_each(
    hub: FakeHub, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection refused was a 68-line ``httpx2.ConnectError`` traceback; an ``--out`` the disk cannot hold
    an ``OSError`` one."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, _, err = run("publish.py", folder, "--repo-id", "me/tiny")
    assert code == 1
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1, err
    assert "upload to me/tiny failed:" in errors[0]
    assert "Traceback" not in err

    def disk_full(*args: object, **kwargs: object) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out"))

    monkeypatch.setattr(dataset, "write_dataset_folder", disk_full)
    task = ["--dataset", "task:arithmetic", "--n-train", "3", "--n-test", "2", "--repo-id", "me/a"]
    code, _, err = run("publish.py", *task, "--out", tmp_path / "out", "--dry-run")
    assert code == 2, err
    assert "No space left on device" in err
    assert "Traceback" not in err


def test_publish_seed_chooses_the_task_problems(tmp_path: Path) -> None:
    """``--seed`` is parsed and named in the card; the problems written must be that seed's (a call that passed
    0 wrote seed 0's problems under any --seed, and no test used another seed)."""
    out = tmp_path / "out"
    flags = ["--n-train", "3", "--n-test", "2", "--seed", "5", "--out", out, "--repo-id", "me/a", "--dry-run"]
    result = run_program("publish.py", "--dataset", "task:arithmetic", *flags)
    assert result.returncode == 0, result.stderr
    written = pq.read_table(out / "data" / "train-00000-of-00001.parquet")["prompt"].to_pylist()
    assert written == [p.prompt for p in get_task("arithmetic").problems("train", 3, 5)]
    assert written != [p.prompt for p in get_task("arithmetic").problems("train", 3, 0)]


def test_publish_out_may_be_an_empty_folder(tmp_path: Path) -> None:
    """``--out`` refuses a folder holding anything but a dataset folder; an empty one (``mkdir out`` first) holds
    nothing to lose and is written (``_written_here``'s first case, which no test reached)."""
    (tmp_path / "out").mkdir()
    flags = ["--n-train", "3", "--n-test", "2", "--out", tmp_path / "out", "--repo-id", "me/a", "--dry-run"]
    result = run_program("publish.py", "--dataset", "task:arithmetic", *flags)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "data" / "train-00000-of-00001.parquet").is_file()


def test_publish_tokens_source_expands_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module docstring's own example is ``--dataset tokens:~/.cache/zmaj/tokens/...``: the shell does not
    expand a ``~`` after ``tokens:``, so the program must (every test passed absolute paths)."""
    folder = tmp_path / "home" / "tokens" / "train-abc"
    folder.mkdir(parents=True)
    documents = [[5, 6, 7, 1], [8, 1]]
    np.asarray([t for d in documents for t in d], dtype=np.uint16).tofile(folder / "tokens.bin")
    np.save(folder / "offsets.npy", np.cumsum([0, *map(len, documents)]).astype(np.int64))
    meta = {"dtype": "uint16", "n_tokens": 6, "vocab_size": 300, "eos_id": 1, "pad_id": 0, "split": "train"}
    (folder / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = run_program(
        "publish.py",
        "--dataset",
        "tokens:~/tokens/train-abc",
        "--repo-id",
        "me/t",
        "--dry-run",
        "--license",
        "mit",
    )
    assert result.returncode == 0, result.stderr
    assert "data/train-00000-of-00001.parquet" in result.stdout
