"""No command dies on a damaged run folder: two real seeds of one sweep, the second with one file deleted, emptied,
cut in half, replaced by a word, by binary junk or by JSON of the wrong types; `sacae status`, `sacae report`,
`sacae sweep` and `sacae eval` go on with the healthy seed and say in words what is wrong with the other."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sacae.cli import main
from tests.conftest import run_cli

TASK = "cartpole_swingup"
# State SAC, two 1000-env-step episodes, evaluations and snapshots at 0, 1000 and 2000 env steps.
TRAIN = ["--encoder_type", "identity", "--decoder_type", "identity", "--action_repeat", "8", "--num_train_steps",
         "250", "--init_steps", "20", "--eval_freq", "125", "--num_eval_episodes", "1", "--hidden_dim", "32",
         "--batch_size", "16", "--num_threads", "1", "--save_model"]  # fmt: skip
SWEEP = ["sweep", "--executor", "local", "--tasks", TASK, "--num_seeds", "2", "--max_parallel", "2"]
JUNK = bytes(range(256)) * 3
KINDS = ("delete", "empty", "half", "word", "binary", "wrong types", "bad line")


def seed_dir(runs: Path, seed: int) -> Path:
    return runs / TASK / "sac_states" / f"seed_{seed}"


def wrong_types(path: Path) -> str:
    """The file as JSON that parses, with values of the wrong type where a reader needs numbers."""
    if path.name == "config.json":
        return json.dumps({**json.loads(path.read_text()), "num_train_steps": "abc", "action_repeat": [8]})
    if path.name == "status.json":
        return json.dumps({**json.loads(path.read_text()), "env_steps": "abc", "sessions": 5, "time": "x", "pid": [1]})
    if path.name == "id":
        return "[1]\n"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1] = {**rows[1], "env_steps": "x", "episode_reward": "abc"}
    return "".join(json.dumps(row) + "\n" for row in rows)


def damage(path: Path, kind: str) -> None:
    if kind == "delete":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "word":
        path.write_text("abc\n")
    elif kind == "binary":
        path.write_bytes(JUNK)
    elif kind == "wrong types":
        path.write_text(wrong_types(path))
    else:  # a line that is not JSON in the middle of a log
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([*lines[:1], "abc\n", *lines[1:]]))


# (file, kind) -> whether the commands that read the file can tell it is damaged. A log cut in half ends in a line
# cut short, which is what a crash mid-write leaves: not damage. An id cut in half is still a number.
CASES = [
    (name, kind)
    for name in ("config.json", "status.json", "train.log", "eval.log", "id", "run.sh")
    for kind in KINDS
    if (kind != "bad line" or name.endswith(".log")) and not (kind == "wrong types" and name == "run.sh")
]


def told(name: str, kind: str) -> bool:
    if name.endswith(".log"):
        return kind in ("word", "binary", "wrong types", "bad line")
    if name == "status.json":
        return True  # a run that logged rows and has no status.json lost it
    if name == "config.json":
        return kind != "delete"
    if name == "id":
        return kind in ("empty", "word", "binary", "wrong types")
    return False


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """Two seeds trained to the end by one local sweep (run.sh, id, stdout, stderr beside the training outputs)."""
    root = tmp_path_factory.mktemp("swept")
    done = run_cli([*SWEEP, "--runs_dir", "runs", "--", *TRAIN], cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.copytree(root / "runs", root / "pristine")
    return root / "runs"


@pytest.fixture
def runs(swept, tmp_path) -> Path:
    shutil.copytree(swept, tmp_path / "runs")
    return tmp_path / "runs"


def last_eval(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.log").read_text().splitlines()[-1])


def status_rows(capsys, runs: Path) -> dict[str, dict]:
    assert main(["status", str(runs), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and not err.strip(), err
    return {row["seed"]: row for row in map(json.loads, out.splitlines())}


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_status_shows_every_run_and_says_what_is_damaged(capsys, runs, name, kind):
    healthy, damaged = seed_dir(runs, 1), seed_dir(runs, 2)
    damage(damaged / name, kind)
    rows = status_rows(capsys, runs)
    assert set(rows) == {"1", "2"}
    one = rows["1"]
    assert (one["state"], one["env_steps"], one["total_env_steps"], one["detail"]) == ("finished", 2000, 2000, "")
    assert one["eval_return"] == pytest.approx(last_eval(healthy)["episode_reward"])
    two = rows["2"]
    if told(name, kind):
        assert two["state"] == "damaged"
        assert two["detail"].startswith("id file " if name == "id" else name + " "), two["detail"]
    else:
        assert two["state"] == "finished" and "damaged" not in two["detail"], two
    assert main(["status", str(runs)]) == 0  # the table too
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out.splitlines()[-1] == ("2 runs: 1 damaged, 1 finished" if told(name, kind)
                                                                else "2 runs: 2 finished")  # fmt: skip


def test_status_table_names_the_damage_in_the_detail_column(capsys, runs):
    damage(seed_dir(runs, 2) / "status.json", "wrong types")
    assert main(["status", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [line for line in lines if line.split()[2:4] == ["2", "damaged"]]
    assert 'status.json has values of the wrong type: env_steps "abc", pid [1], time "x", sessions 5' in line
    assert lines[-1] == "2 runs: 1 damaged, 1 finished"


def report(runs: Path, capsys) -> tuple[int, str, dict, str]:
    code = main(["report", str(runs), "--at", "2000", "--bootstrap_reps", "20"])
    _, err = capsys.readouterr()
    assert "Traceback" not in err, err
    out = runs / "report"
    if code != 0:
        return code, err, {}, ""
    return code, err, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


REPORT_CASES = [(n, k) for n, k in CASES if n in ("config.json", "status.json", "train.log", "eval.log")]


@pytest.mark.parametrize(("name", "kind"), REPORT_CASES)
def test_report_leaves_out_or_notes_a_damaged_run_and_reports_the_others(capsys, runs, name, kind):
    healthy, damaged = seed_dir(runs, 1), seed_dir(runs, 2)
    damage(damaged / name, kind)
    code, err, summary, markdown = report(runs, capsys)
    assert code == 0, err
    (cell,) = [c for c in summary["cells"] if c["configuration"] == "sac_states"]
    assert cell["values"]["seed_1"] == pytest.approx(last_eval(healthy)["episode_reward"])
    seeds = [r["seed"] for r in summary["runs"]]
    left_out = name == "config.json"
    assert seeds == (["seed_1"] if left_out else ["seed_1", "seed_2"])
    noted = [line for line in markdown.splitlines() if line.startswith(f"- `{TASK}/sac_states/seed_2`: ")]
    if left_out or (told(name, kind) and name != "status.json") or (name == "status.json" and kind != "delete"):
        (note,) = noted
        assert name in note and note.endswith("the run is left out." if left_out else "left out of the report.")
    else:
        assert not noted and "Runs with damaged files" not in markdown
    if name == "eval.log" and not left_out and kind in ("wrong types", "bad line"):
        assert cell["values"]["seed_2"] == pytest.approx(last_eval(damaged)["episode_reward"])  # the rest is used


def test_report_note_says_which_line_of_a_log_is_damaged(capsys, runs):
    damage(seed_dir(runs, 2) / "eval.log", "wrong types")
    damage(seed_dir(runs, 2) / "train.log", "bad line")
    _, _, _, markdown = report(runs, capsys)
    assert (f"- `{TASK}/sac_states/seed_2`: eval.log line 2 has values of the wrong type: env_steps \"x\", "
            'episode_reward "abc"; train.log line 2 is not JSON; what cannot be read is left out of the report.'
            ) in markdown  # fmt: skip


def test_report_with_no_readable_run_is_one_sentence(runs):
    for seed in (1, 2):
        damage(seed_dir(runs, seed) / "config.json", "word")
    result = run_cli(["report", str(runs), "--bootstrap_reps", "20"], cwd=runs.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"sacae: error: None of the 2 runs under {runs} can be read ({TASK}/sac_states/seed_1: config.json cannot be "
        f"read as JSON (Expecting value at line 1 column 1); {TASK}/sac_states/seed_2: config.json cannot be read as "
        "JSON (Expecting value at line 1 column 1))."
    ]


def test_commands_as_a_user_runs_them(runs):
    """status and report in their own processes, over a run whose files are all damaged at once."""
    damaged = seed_dir(runs, 2)
    for name, kind in (("status.json", "binary"), ("eval.log", "bad line"), ("train.log", "wrong types"),
                       ("id", "word")):  # fmt: skip
        damage(damaged / name, kind)
    status = run_cli(["status", "runs"], cwd=runs.parent)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    (line,) = [x for x in status.stdout.splitlines() if x.split()[2:4] == ["2", "damaged"]]
    assert "status.json cannot be read as JSON (it is not UTF-8 text)" in line
    done = run_cli(["report", "runs", "--at", "2000", "--bootstrap_reps", "20"], cwd=runs.parent)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    markdown = (runs / "report" / "report.md").read_text()
    assert (f"- `{TASK}/sac_states/seed_2`: eval.log line 2 is not JSON; train.log line 2 has values of the wrong "
            'type: env_steps "x", episode_reward "abc"; status.json cannot be read as JSON (it is not UTF-8 text); '
            "what cannot be read is left out of the report.") in markdown  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# sacae sweep


@pytest.fixture
def swept_again(swept) -> Path:
    """The sweep's own folder as the sweep left it: its run.sh files name their folders, which a copy would not be."""
    shutil.rmtree(swept)
    shutil.copytree(swept.parent / "pristine", swept)
    return swept


def sweep_again(runs: Path):
    result = run_cli([*SWEEP, "--runs_dir", "runs", "--", *TRAIN], cwd=runs.parent)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_sweep_leaves_a_run_with_a_damaged_config_alone_and_says_why(swept_again):
    runs = swept_again
    damage(seed_dir(runs, 2) / "config.json", "wrong types")
    (seed_dir(runs, 2) / "status.json").write_text(json.dumps({"state": "stopped"}))
    result = sweep_again(runs)
    assert result.returncode == 0, result.stderr
    assert f"{TASK}/sac_states/seed_1: finished, skipped" in result.stdout
    assert (f"{TASK}/sac_states/seed_2: its config.json has values of the wrong type: action_repeat [8], "
            f"num_train_steps \"abc\", so the run cannot resume; left alone (remove {seed_dir(runs, 2)} to start it "
            "over)") in result.stdout  # fmt: skip


def test_sweep_starts_a_run_whose_status_cannot_be_read_again(swept_again):
    """The sweep cannot know where the run stands; the trainer can, from its checkpoint: here, finished."""
    damaged = seed_dir(swept_again, 2)
    damage(damaged / "status.json", "word")
    result = sweep_again(swept_again)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"{TASK}/sac_states/seed_2: its status.json cannot be read as JSON (Expecting value at line 1 column 1); "
            "the run starts again, from its last checkpoint") in result.stdout  # fmt: skip
    assert f"{TASK}/sac_states/seed_2: finished in " in result.stdout
    assert "is already finished" in (damaged / "stderr").read_text()


def test_sweep_writes_a_damaged_run_script_and_id_anew(swept_again):
    damaged = seed_dir(swept_again, 2)
    (damaged / "status.json").write_text(json.dumps({"state": "stopped", "env_steps": 2000}))
    damage(damaged / "run.sh", "binary")
    damage(damaged / "id", "wrong types")
    result = sweep_again(swept_again)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{TASK}/sac_states/seed_2: its run.sh is not text; it is written anew" in result.stdout
    assert (f"{TASK}/sac_states/seed_2: its id holds \"[1]\", which is no job or process id; it is written anew"
            in result.stdout)  # fmt: skip
    assert (damaged / "id").read_text().strip().isdigit()
    assert (damaged / "run.sh").read_text().startswith("#!/usr/bin/env bash\n")
    assert "is already finished" in (damaged / "stderr").read_text()


# ---------------------------------------------------------------------------------------------------------------
# sacae eval


def one_sentence(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sacae: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("delete", "There is no config file at {path}."),
        ("empty", "The config file {path} is empty."),
        ("word", "The config file {path} cannot be read as JSON (Expecting value at line 1 column 1)."),
        ("binary", "The config file {path} cannot be read as JSON (it is not UTF-8 text)."),
        (
            "wrong types",
            'The config file {path} has values of the wrong type: action_repeat [8], num_train_steps "abc".',
        ),
    ],
)
def test_eval_with_a_damaged_config_is_one_sentence(capsys, runs, kind, expected):
    run_dir = seed_dir(runs, 2)
    damage(run_dir / "config.json", kind)
    line = one_sentence(capsys, ["eval", str(run_dir), "--no_save_video"])
    assert line == "sacae: error: " + expected.format(path=run_dir / "config.json")


def test_eval_with_a_damaged_snapshot_is_one_sentence(capsys, runs, tmp_path):
    run_dir = seed_dir(runs, 2)
    snapshot = run_dir / "model" / "2000.pt"
    half = tmp_path / "half.pt"
    half.write_bytes(snapshot.read_bytes()[: snapshot.stat().st_size // 2])
    line = one_sentence(capsys, ["eval", str(run_dir), "--snapshot", str(half)])
    assert line.startswith(f"sacae: error: {half} is not a readable sacae snapshot")
    other = tmp_path / "other.pt"
    torch.save({"networks": {"actor": [1, 2]}, "log_alpha": torch.zeros(())}, other)
    assert one_sentence(capsys, ["eval", str(run_dir), "--snapshot", str(other)]) == (
        f"sacae: error: {other} is not a sacae snapshot (it has no networks)."
    )
    checkpoint = next((run_dir / "checkpoint").glob("state-*.pt"))
    assert one_sentence(capsys, ["eval", str(run_dir), "--snapshot", str(checkpoint)]) == (
        f"sacae: error: {checkpoint} is not a sacae snapshot (it has no networks)."
    )


def test_eval_of_a_snapshot_of_another_configuration_is_one_sentence(capsys, runs):
    run_dir = seed_dir(runs, 2)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "hidden_dim": 64}))
    assert one_sentence(capsys, ["eval", str(run_dir), "--no_save_video"]) == (
        f"sacae: error: {run_dir / 'model' / '2000.pt'} holds the networks of another configuration (hidden_dim 32) "
        f"than the run in {run_dir} (hidden_dim 64); give a snapshot of this run with --snapshot."
    )


def test_eval_takes_the_latest_snapshot_past_files_of_other_names(capsys, runs):
    run_dir = seed_dir(runs, 2)
    (run_dir / "model" / "notes.pt").write_text("notes")
    (run_dir / "model" / "abc.pt").write_bytes(JUNK)
    assert main(["eval", str(run_dir), "--no_save_video", "--num_episodes", "1"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["snapshot"], result["env_steps"]) == (str(run_dir / "model" / "2000.pt"), 2000)
    for snapshot in run_dir.glob("model/[0-9]*.pt"):
        snapshot.unlink()
    assert one_sentence(capsys, ["eval", str(run_dir)]) == (
        f"sacae: error: {run_dir} has no snapshot in model/; train with --save_model to write them."
    )
