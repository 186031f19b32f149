"""`trl-mgsr distill` end to end (full, LoRA + merge), the model card it writes, and every CLI error path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_mgsr
from trl_mgsr.cli import main
from trl_mgsr.evaluation import load_model
from trl_mgsr.testing import build_pair

ROWS = [
    {"instruction": "Name a color.", "input": "", "output": "Red is a color."},
    {"instruction": "Repeat the text.", "input": "The quick brown fox", "output": ["The quick brown fox", "A fox"]},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate to German: good morning.", "input": "", "output": "Guten Morgen."},
]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    yield
    torch.set_num_threads(before)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("distill")
    student, teacher = build_pair(tokenizer, "llama")
    for model, name in ((student, "student"), (teacher, "teacher")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", ROWS * 2)
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    teacher.save_pretrained(root / "nan-teacher")
    tokenizer.save_pretrained(root / "nan-teacher")
    return root


def distill_args(root, output_dir, *extra):
    return [
        "distill", "--model_name_or_path", str(root / "student"), "--teacher_model_name_or_path",
        str(root / "teacher"), "--dataset_name", str(root / "train.jsonl"), "--output_dir", str(output_dir),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "4", "--max_length", "96",
        "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--gradient_checkpointing", "false", "--lmbda", "0.5", *extra,
    ]


def generate(model, tokenizer):
    ids = tokenizer("Name a color.", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    return out


@pytest.fixture(scope="module")
def full_run(workdir):
    out = workdir / "full"
    assert main(distill_args(workdir, out, "--dac_weight", "0.5", "--learning_rate", "1e-3")) == 0
    return out


def test_distill_full_reloads_and_generates(full_run):
    model = AutoModelForCausalLM.from_pretrained(full_run)
    tokenizer = AutoTokenizer.from_pretrained(full_run)
    generate(model, tokenizer)
    assert (full_run / "model.safetensors").is_file() and not (full_run / "adapter_config.json").exists()


def test_model_card_names_mgsr_teacher_dataset_settings_and_citation(full_run, workdir):
    card = (full_run / "README.md").read_text()
    assert "## MGSR distillation" in card and "**MGSR**" in card
    assert f"**Teacher:** `{workdir / 'teacher'}`" in card
    assert f"**Dataset:** `{workdir / 'train.jsonl'}`" in card
    assert "### MGSR settings" in card
    assert "| `dac_weight` | `0.5` |" in card and "| `scrg_rounds` | `1` |" in card  # the value we passed
    assert "| `schedule` | `'gkd'` |" in card and "`lmbda=0.5`" in card
    assert "@inproceedings{liu2026mgsr" in card and "arXiv 2407.10068" in card
    assert "datasets:" not in card  # a local file is not presented as a Hub dataset
    assert "licence:" not in card  # TRL's placeholder
    procedure = card.split("## Training procedure\n\n", 1)[1]
    assert procedure.startswith(f"Distilled from the teacher `{workdir / 'teacher'}` with `MGSRTrainer`")
    assert card.count("## MGSR distillation") == 1


def test_distill_lora_merge_adapter(workdir):
    out = workdir / "lora"
    args = distill_args(workdir, out, "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules",
                        "q_proj", "v_proj", "--learning_rate", "5e-2", "--merge_adapter")
    assert main(args) == 0
    assert (out / "adapter_config.json").is_file()
    merged_dir = workdir / "lora-merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "README.md").is_file()
    card = (merged_dir / "README.md").read_text()
    assert "# Model Card for lora-merged" in card and "## MGSR distillation" in card
    assert f'model="{merged_dir}"' in card  # its quick start loads the merged model, not the adapter
    assert "# Model Card for lora\n" in (out / "README.md").read_text()  # the adapter's own card is unchanged

    adapter_model, tokenizer = load_model(str(out), device="cpu")  # base found through adapter_config.json
    generate(adapter_model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(workdir / "student").eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapter_logits, merged_logits, base_logits = (m(ids).logits for m in (adapter_model, merged, base))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter is trained, so the check has teeth


# ---------------------------------------------------------------------------------------------- error paths

ERRORS = {
    "unknown command": (lambda w, t: ["distil"], "unknown command"),
    "distill missing file": (lambda w, t: ["--dataset_name", str(t / "missing.jsonl")],
                             "missing.jsonl: no such file"),
    "distill missing file flag": (lambda w, t: ["--dataset_name", "missing.jsonl"], "--dataset_name missing.jsonl"),
    "distill eval without data": (lambda w, t: ["--eval_strategy", "steps"], "--eval_strategy steps needs"),
    "distill unknown column": (lambda w, t: ["--dataset_name", str(t / "bad.jsonl")],
                               "has columns ['answer', 'question']"),
    "distill bad flag": (lambda w, t: ["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag 1"),
    # reported before TrainingArguments' own checks (bf16 fails there on a machine without bf16, e.g. this CPU)
    "distill bad flag first": (lambda w, t: ["--bf16", "true", "--bogus_flag", "1"],
                               "unrecognized arguments: --bogus_flag 1"),
    "distill bad value": (lambda w, t: ["--dac_lo", "2"], "MGSRConfig.dac_lo must be in [0, 1]"),
    "distill bad choice": (lambda w, t: ["--schedule", "nope"], "invalid choice"),
    "distill merge without peft": (lambda w, t: ["--merge_adapter"], "--merge_adapter needs --use_peft"),
    "distill missing model": (lambda w, t: ["--model_name_or_path", str(t / "nowhere")], "no such model directory"),
    "eval missing file": (lambda w, t: ["eval", "--model", str(w / "student"), "--data", str(t / "x.jsonl")],
                          "no such file"),
    "eval unknown column": (lambda w, t: ["eval", "--model", str(w / "student"), "--data", str(t / "bad.jsonl")],
                            "has columns ['answer', 'question']"),
    "eval missing model": (lambda w, t: ["eval", "--model", str(t / "nowhere"), "--data", str(w / "train.jsonl")],
                           "no such model directory"),
    "eval bad flag": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--bogus"],
                      "unrecognized arguments: --bogus"),
    "eval bad row": (lambda w, t: ["eval", "--model", str(w / "student"), "--data", str(w / "train.jsonl"),
                                   str(t / "badrow.jsonl")], "badrow.jsonl: row 1: no `output` column"),
    "eval bad prompt length": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--max_prompt_length", "-3"],
                               "--max_prompt_length must be >= 1"),
    "eval bad max_samples": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--max_samples", "0"],
                             "--max_samples must be >= 1"),
    "eval repeated seeds": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--seeds", "10", "10"],
                            "--seeds must be distinct"),
    "eval unknown device": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--device", "bogus"],
                            "is not a torch device"),
    "eval absent device": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--device", "xpu"],
                           "no xpu device is available"),
    "distill empty file": (lambda w, t: ["--dataset_name", write_jsonl(t / "empty.jsonl", [])],
                           "empty.jsonl: the file has no rows"),
    "distill reversed band": (lambda w, t: ["--dac_lo", "0.9", "--dac_hi", "0.1"], "band edges are reversed"),
    "distill bad threads": (lambda w, t: ["--threads", "0"], "--threads must be an integer >= 1"),
    "distill nan teacher": (lambda w, t: ["--teacher_model_name_or_path", str(w / "nan-teacher")],
                            "the teacher's logits are non-finite (NaN/inf) at global step 0"),
    "eval bad threads": (lambda w, t: ["eval", "--model", "m", "--data", "d.jsonl", "--threads", "0"],
                         "--threads must be an integer >= 1"),
    "demo bad flag": (lambda w, t: ["demo", "--bogus"], "unrecognized arguments: --bogus"),
    "demo bad threads": (lambda w, t: ["demo", "--threads", "-1"], "--threads must be >= 1"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_cli_error_is_one_line(case, workdir, tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(tmp_path / "badrow.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    make, expected = ERRORS[case]
    argv = make(workdir, tmp_path)
    if case.startswith("distill"):
        argv = distill_args(workdir, tmp_path / "out", *argv)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("trl-mgsr") and ": error: " in lines[0] and expected in lines[0], lines[0]
    if case == "distill nan teacher":  # stopped in training: the Trainer made the directory, nothing was saved
        assert not list((tmp_path / "out").glob("**/*.safetensors"))
    else:
        assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh interpreter imports torch/transformers/trl: ~10 s
def test_module_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trl_mgsr", "eval", "--model", str(tmp_path / "nowhere"), "--data",
         str(tmp_path / "missing.jsonl")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(trl_mgsr.__file__).parents[1]), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"trl-mgsr eval: error: {tmp_path / 'missing.jsonl'}: no such file"]


def test_distill_push_to_hub_goes_through_trainer_push_to_hub(workdir, monkeypatch):
    """`--push_to_hub` runs the real `Trainer.push_to_hub` (repo creation, save, card, upload); only the Hub client
    is replaced by a recorder, since tests are offline."""
    import transformers.trainer

    calls = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            card = (Path(folder_path) / "README.md").read_text()
            calls.append(("upload_folder", repo_id, folder_path, sorted(p.name for p in Path(folder_path).iterdir()),
                          card))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHub())
    out = workdir / "pushed"
    assert main(distill_args(workdir, out, "--push_to_hub", "--hub_model_id", "someone/mgsr-tiny")) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]  # one upload, at the end
    _, repo_id, folder, files, card = calls[1]
    assert repo_id == "someone/mgsr-tiny" and Path(folder) == out
    assert {"model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "## MGSR distillation" in card and str(workdir / "train.jsonl") in card


@pytest.mark.parametrize("saved", ["dataset", "dataset_dict"])
def test_distill_loads_a_saved_dataset_directory(saved, tmp_path):
    from datasets import Dataset, DatasetDict

    from trl_mgsr import MGSRConfig
    from trl_mgsr.distill import MGSRScriptArguments, load_datasets

    rows = [r for r in ROWS if isinstance(r["output"], str)]
    data = Dataset.from_list(rows)
    (DatasetDict({"train": data}) if saved == "dataset_dict" else data).save_to_disk(str(tmp_path / "saved"))
    script_args = MGSRScriptArguments(dataset_name=str(tmp_path / "saved"))
    train, evaluation, source = load_datasets(script_args, MGSRConfig("out", use_cpu=True, report_to="none"))
    assert len(train) == len(rows) and {"prompt", "completion"} <= set(train.column_names) and evaluation is None


@pytest.mark.parametrize("command", ["distill student", "distill teacher", "eval"])
def test_mistyped_relative_model_path_is_no_such_model_directory(command, workdir, monkeypatch, capsys):
    """`mgsr-demo/teachr` next to `mgsr-demo/`: a local path, not a Hub id (offline or not)."""
    monkeypatch.chdir(workdir.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    typo = f"{workdir.name}/teachr"
    if command == "eval":
        argv, flag = ["eval", "--model", typo, "--data", str(workdir / "train.jsonl")], "--model"
    else:
        flag = "--model_name_or_path" if command.endswith("student") else "--teacher_model_name_or_path"
        argv = distill_args(workdir, workdir / "typo-out", flag, typo)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"trl-mgsr {command.split()[0]}: error: {flag} {typo}: no such model directory (check the path; Hub ids "
        "look like org/name)"
    ]


@pytest.mark.parametrize("threads, expected", [(None, 1), (2, 2)])
def test_distill_uses_one_thread_for_tiny_models_on_cpu_unless_told(threads, expected, workdir):
    torch.set_num_threads(2)
    extra = [] if threads is None else ["--threads", str(threads)]
    assert main(distill_args(workdir, workdir / f"threads-{threads}", "--max_steps", "1", *extra)) == 0
    assert torch.get_num_threads() == expected


@pytest.mark.parametrize("threads, expected", [(None, 1), (2, 2)])
def test_eval_uses_one_thread_for_tiny_models_on_cpu_unless_told(threads, expected, workdir, tmp_path):
    torch.set_num_threads(2)
    extra = [] if threads is None else ["--threads", str(threads)]
    argv = ["eval", "--model", str(workdir / "student"), "--data", str(workdir / "train.jsonl"), "--seeds", "1",
            "--max_new_tokens", "2", "--no_progress", "--output_dir", str(tmp_path), *extra]
    assert main(argv) == 0
    assert torch.get_num_threads() == expected


def test_distill_help_lists_mgsr_flags_first_and_is_truthful_about_the_teacher(capsys):
    assert main(["distill", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("MGSR options"))
    rest = next(i for i, line in enumerate(lines) if line.startswith("TRL and Transformers options"))
    assert first < 10 < rest  # the short usage, then MGSR's options
    mgsr = " ".join(" ".join(lines[first:rest]).split())
    for flag in ("--teacher_model_name_or_path", "--sft_weight", "--dac_weight", "--span_weight", "--scrg_rounds",
                 "--threads", "--train_file"):
        assert flag in mgsr, flag
    assert "--learning_rate" not in mgsr and "--learning_rate" in "\n".join(lines[rest:])
    assert "same as the model" not in text and "The teacher: a local model directory or a Hub id (required)." in mgsr
    assert "(default: 1.0)" in mgsr  # defaults stated

    assert main(["distill", "--help-mgsr"]) == 0
    short = capsys.readouterr().out
    # MGSR's ~65 fields only: about 200 lines, against 900 for the whole listing
    assert "--dac_weight" in short and "--learning_rate" not in short and len(short.splitlines()) < 300


def test_eval_help_states_defaults(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("--batch_size BATCH_SIZE Prompts per generate call; samples depend on it, so compare models "
                    "with the same value. (default: 8)", "(default: 256)", "(default: [10, 20, 30])",
                    "(default: mgsr-eval)"):
        assert default in text, default


@pytest.mark.slow  # fresh interpreters: ~30 s
def test_default_runs_show_no_deprecation_warning_and_no_progress_flags_hide_every_bar(workdir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(trl_mgsr.__file__).parents[1]), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "default"}
    env.pop("TRL_EXPERIMENTAL_SILENCE", None)
    argv = distill_args(workdir, tmp_path / "out")
    for flag in ("--gradient_checkpointing", "--disable_tqdm"):  # back to TRL's defaults
        at = argv.index(flag)
        argv = argv[:at] + argv[at + 2:]
    runs = {
        "distill": argv,
        "distill quiet": [*argv, "--disable_tqdm", "true"],
        "eval quiet": ["eval", "--model", str(tmp_path / "out"), "--data", str(workdir / "train.jsonl"), "--seeds",
                       "1", "--max_new_tokens", "2", "--no_progress", "--output_dir", str(tmp_path / "eval")],
    }
    for name, args in runs.items():
        proc = subprocess.run([sys.executable, "-m", "trl_mgsr", *args], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        output = proc.stdout + proc.stderr
        assert "deprecated" not in output and "FutureWarning" not in output, (name, output[-3000:])
        if "quiet" in name:
            assert "it/s]" not in output and "Loading weights" not in output, (name, output[-3000:])


@pytest.mark.parametrize("flag, expected", [([], False), (["--dataloader_pin_memory", "true"], True)])
def test_distill_does_not_pin_memory_on_a_cpu_unless_told(flag, expected, tmp_path):
    """torch warns at every dataloader when memory is pinned without an accelerator (transformers only turns pinning
    off with --use_cpu)."""
    from trl_mgsr.distill import parse_args

    _, training_args, _ = parse_args(["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--bf16",
                                      "false", "--output_dir", str(tmp_path), *flag])
    assert training_args.dataloader_pin_memory is expected
