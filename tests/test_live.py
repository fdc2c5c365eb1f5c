"""The live monitor: bundle, Trainer callback and checkpoint watcher, on a tiny random model."""

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from traitmon import MonitorBundle, TraitMonitorCallback, build_bundle, complete_checkpoints, watch
from traitmon.capture import capture_dataset
from traitmon.config import validate_config
from traitmon.directions import extract_trait_direction
from traitmon.drift import drift_scale, load_directions, project
from traitmon.errors import TraitmonError
from traitmon.models import build_random_model, load_model
from traitmon.settings import study_settings
from traitmon.store import write_dataset
from traitmon.traits import load_traits

TRAITS = ["honesty", "sycophancy"]


@pytest.fixture(scope="module")
def bundle_setup(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    model, tok = load_model(tiny_model_dir)
    cfg = validate_config({"models": {"t": {"source": {"path": "x"}}}, "traits": TRAITS,
                           "directions": {"questions": 4, "max_new_tokens": 8, "batch_size": 8, "temperature": 1.0}})
    paths = []
    for name, trait in load_traits(TRAITS).items():
        ds, _ = extract_trait_direction(model, tok, trait, study_settings(cfg).directions, "tiny")
        paths.append(str(write_dataset(ds, folder / f"{name}.zarr")))
    bundle = build_bundle(model, tok, "tiny", paths, per_trait_questions=1, variant="response_mean",
                          monitor_path=None, batch_size=16, model_dtype="auto")
    return bundle, paths, folder


def offline_drift(model_dir, adapter, bundle, direction_paths, precision="fp32"):
    """What `traitmon capture` + the drift computation give for a saved checkpoint."""
    dirs = load_directions(direction_paths, "response_mean")
    out = {}
    for name, adp in (("base", None), ("ckpt", adapter)):
        model, tok = load_model(model_dir, adapter=adp)
        ds = capture_dataset(model, tok, bundle.prompt_ids, bundle.chats, bundle.reference, None, 8, "float32", {},
                             precision)
        out[name] = project(ds["response_mean"], dirs)
    scale = drift_scale(out["base"].transpose("prompt", "trait").values)  # the drift table's base-spread units
    return ((out["ckpt"] - out["base"]) / scale).mean("prompt").values


def test_callback_logs_the_same_drift_as_offline_capture(tiny_model_dir, bundle_setup, tmp_path):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from traitmon.chat import AssistantOnlyCollator, encode_training_example
    from traitmon.config import validate_config as vc
    from traitmon.finetune import lora_config
    from traitmon.perturbations import load_domain, written_rows
    from traitmon.settings import study_settings

    bundle, direction_paths, _ = bundle_setup
    model, tok = load_model(tiny_model_dir)
    model.train()
    settings = study_settings(vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"],
                                  "finetune": {"rank": 4, "alpha": 8, "max_length": 256}})).finetune
    model = get_peft_model(model, lora_config(settings))
    rows = written_rows(load_domain("medical"), "em", 16, seed=0)
    dataset = [encode_training_example(tok, r["messages"], 256) for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_steps=2, save_strategy="steps", logging_steps=1,
                             report_to=[], use_cpu=True, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=AssistantOnlyCollator(tok.pad_token_id))
    callback = TraitMonitorCallback(bundle, tok, every=2, store=tmp_path / "live.zarr").attach(trainer)
    trainer.train()
    assert [h["step"] for h in callback.history] == [2, 4]
    logged = [e for e in trainer.state.log_history if "traitmon/drift_honesty" in e]
    assert len(logged) == 2
    for entry in callback.history:
        expected = offline_drift(tiny_model_dir, tmp_path / f"run/checkpoint-{entry['step']}", bundle, direction_paths)
        got = np.array([entry[f"drift_{t}"] for t in bundle.traits])
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)
        assert np.abs(got).max() > 0  # training moved the activations
    from traitmon.store import open_dataset
    stored = open_dataset(tmp_path / "live.zarr", load=True)
    assert list(stored.step.values) == [2, 4] and stored["drift"].dims == ("step", "trait")


def test_bundle_round_trip_and_refusal(bundle_setup, tiny_model, tmp_path):
    bundle, _, _ = bundle_setup
    bundle.save(tmp_path / "b")
    model, _ = tiny_model
    loaded = MonitorBundle.load(tmp_path / "b", model=model)
    np.testing.assert_array_equal(loaded.directions, bundle.directions)
    other, _ = build_random_model({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "seed": 99})
    with pytest.raises(TraitmonError, match="bundle built for model 'tiny'"):
        MonitorBundle.load(tmp_path / "b", model=other)
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(TraitmonError, match="rebuild it"):
        MonitorBundle.load(tmp_path / "b")


def random_adapter(model_dir, folder):
    """A saved LoRA adapter with random B matrices (so it moves the activations)."""
    from peft import get_peft_model

    from traitmon.config import validate_config as vc
    from traitmon.finetune import lora_config
    from traitmon.settings import study_settings

    settings = study_settings(vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"]})).finetune
    model, _ = load_model(model_dir)
    peft_model = get_peft_model(model, lora_config(settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


def test_a_bf16_bundle_scores_as_bf16_captures_do(tiny_model_dir, bundle_setup, tmp_path):
    """capture.precision travels in the bundle: the live check and ``watch`` compute as the offline captures."""
    _, paths, _ = bundle_setup
    model, tok = load_model(tiny_model_dir)
    build_bundle(model, tok, "tiny", paths, per_trait_questions=1, variant="response_mean", monitor_path=None,
                 batch_size=16, model_dtype="auto", precision="bf16").save(tmp_path / "b")
    bundle = MonitorBundle.load(tmp_path / "b")
    assert bundle.precision == "bf16"
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    checkpoint, _ = load_model(tiny_model_dir, adapter=adapter)
    scored = bundle.score(checkpoint, tok)
    got = np.array([scored[f"drift_{t}"] for t in bundle.traits])
    np.testing.assert_allclose(got, offline_drift(tiny_model_dir, adapter, bundle, paths, "bf16"), atol=2e-4,
                               rtol=1e-3)
    assert np.abs(got - offline_drift(tiny_model_dir, adapter, bundle, paths, "fp32")).max() > 1e-4
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    del meta["precision"]  # a bundle saved before the precision was recorded measured in float32
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    assert MonitorBundle.load(tmp_path / "b").precision == "fp32"


def test_watch_scores_complete_checkpoints_and_waits_for_half_written_ones(tiny_model_dir, bundle_setup, tmp_path):
    bundle, _, _ = bundle_setup
    source = random_adapter(tiny_model_dir, tmp_path / "adapter")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(source, run / "checkpoint-2")
    half = run / "checkpoint-4"
    half.mkdir()
    shutil.copy(source / "adapter_config.json", half)
    blob = (source / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])  # a writer mid-way

    lines = []
    results = watch(run, tiny_model_dir, bundle, once=True, interval=0.2, printer=lines.append)
    assert [r["checkpoint"] for r in results] == ["checkpoint-2"]
    assert lines and lines[0].startswith("checkpoint-2: honesty=")

    def finish_later():
        time.sleep(0.5)
        (half / "adapter_model.safetensors").write_bytes(blob)

    threading.Thread(target=finish_later).start()
    # generous timeout (a loaded machine scores slowly); polling ends as soon as both checkpoints are scored
    results = watch(run, tiny_model_dir, bundle, interval=0.3, timeout=300, max_checkpoints=2, printer=lines.append)
    assert "checkpoint-4" in [r["checkpoint"] for r in results]
    sizes = {}
    complete_checkpoints(run, sizes)
    assert len(complete_checkpoints(run, sizes)) == 2


def _fitted_monitor():
    from traitmon.monitor import candidates, fit_monitor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    em_rate = np.clip(0.1 + 0.1 * x[:, 0], 0, 1)
    return fit_monitor(x, em_rate, np.repeat(np.arange(4), 10), 0.1, 0.05, candidates(),
                       [f"drift_{t}" for t in TRAITS])


def test_bundle_is_a_folder_of_plain_data_and_scores_the_same(bundle_setup, tiny_model_dir, tmp_path):
    import dataclasses

    bundle = dataclasses.replace(bundle_setup[0], monitor=_fitted_monitor())
    bundle.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["arrays.safetensors", "bundle.json"]
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["format_version"] == 1 and meta["traits"] == TRAITS and meta["prompt_ids"] == bundle.prompt_ids
    assert meta["monitor"]["features"] == [f"drift_{t}" for t in TRAITS] and "coef" in meta["monitor"]
    (tmp_path / "b" / ".snakemake_timestamp").touch()  # what Snakemake adds to a directory output
    loaded = MonitorBundle.load(tmp_path / "b")
    np.testing.assert_array_equal(loaded.base_projection, bundle.base_projection)
    model, tok = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected, got = bundle.score(model, tok), loaded.score(model, tok)
    assert got.keys() == expected.keys() and "monitor_score" in got
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9)


class _Payload:
    """What a crafted single-file bundle carried: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _payload_bytes(marker) -> bytes:
    import pickle

    return pickle.dumps(_Payload(marker))


def test_a_bundle_carrying_a_pickle_payload_is_refused_not_executed(bundle_setup, tiny_model_dir, tmp_path, capsys):
    from traitmon.cli import main
    from traitmon.monitor import FittedMonitor

    marker = tmp_path / "PWNED"
    blob = _payload_bytes(marker)
    single = tmp_path / "evil.pkl"
    single.write_bytes(blob)
    attempts = {"single file": single}
    for name, replace in (("json", "bundle.json"), ("arrays", "arrays.safetensors"), ("extra", "evil.pkl")):
        folder = tmp_path / name
        bundle_setup[0].save(folder)
        (folder / replace).write_bytes(blob)
        attempts[name] = folder
    for what, path in attempts.items():
        with pytest.raises(TraitmonError) as err:
            MonitorBundle.load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), what
    with pytest.raises(TraitmonError, match="evil.pkl"):
        FittedMonitor.load(single)
    run = tmp_path / "run"
    run.mkdir()
    assert main(["watch", str(run), "--model-dir", str(tiny_model_dir), "--bundle", str(single), "--once"]) == 2
    assert str(single) in capsys.readouterr().err
    assert not marker.exists()  # the payload never ran


def test_truncated_or_foreign_bundle_is_a_one_line_error_naming_the_path(bundle_setup, tmp_path):
    from safetensors.numpy import save_file

    bundle = bundle_setup[0]

    def broken(name, damage):
        folder = tmp_path / name
        bundle.save(folder)
        damage(folder)
        return folder

    def wrong_shape(folder):
        save_file({"directions": bundle.directions, "base_projection": bundle.base_projection[:-1]},
                  str(folder / "arrays.safetensors"))

    def truncate(folder):
        data = (folder / "arrays.safetensors").read_bytes()
        (folder / "arrays.safetensors").write_bytes(data[: len(data) // 2])

    cases = {
        "missing": (broken("missing", lambda f: (f / "arrays.safetensors").unlink()), "arrays.safetensors is missing"),
        "bad json": (broken("badjson", lambda f: (f / "bundle.json").write_text("{not json")), "not valid JSON"),
        "foreign": (broken("foreign", lambda f: (f / "bundle.json").write_text('{"a": 1}')), "not a traitmon"),
        "truncated": (broken("truncated", truncate), "not a readable safetensors"),
        "wrong shape": (broken("shape", wrong_shape), "base_projection has shape"),
        "no such": (tmp_path / "nowhere", "no such monitor bundle"),
    }
    for what, (path, message) in cases.items():
        with pytest.raises(TraitmonError, match=message) as err:
            MonitorBundle.load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), what


def test_watch_on_a_missing_run_folder_fails_at_once_naming_it(bundle_setup, tiny_model_dir, tmp_path, capsys):
    from traitmon.cli import main

    bundle = bundle_setup[0]
    missing = tmp_path / "no-such-run"
    with pytest.raises(TraitmonError, match="no-such-run"):
        watch(missing, tiny_model_dir, bundle, once=True)
    with pytest.raises(TraitmonError, match="no-such-run"):
        watch(missing, tiny_model_dir, bundle, interval=0.1, timeout=1.0)  # polling: used to poll forever
    bundle.save(tmp_path / "b")
    for extra in (["--once"], ["--interval", "0.1"]):
        assert main(["watch", str(missing), "--model-dir", str(tiny_model_dir), "--bundle", str(tmp_path / "b"),
                     *extra]) == 2
        assert str(missing) in capsys.readouterr().err


def test_callback_warns_when_the_model_dtype_is_not_the_bundles(bundle_setup, tiny_model_dir):
    import dataclasses
    from types import SimpleNamespace

    bundle = dataclasses.replace(bundle_setup[0], model_dtype="bfloat16")
    model, tok = load_model(tiny_model_dir, "float32")
    callback = TraitMonitorCallback(bundle, tok, every=1)
    state, control = SimpleNamespace(global_step=1, log_history=[]), SimpleNamespace(should_training_stop=False)
    with pytest.warns(UserWarning, match="bundle's base reference was measured in torch.bfloat16"):
        callback.on_step_end(None, state, control, model=model)
    assert len(callback.history) == 1


class _ScriptedMonitor:
    """A monitor whose successive scores are given: the test decides which checks alarm."""

    def __init__(self, scores, threshold=0.5):
        self.scores, self.threshold, self.features = list(scores), threshold, [f"drift_{t}" for t in TRAITS]

    def score(self, frame, source="table"):
        return np.array([self.scores.pop(0)])


class _Snapshots:
    """Records the adapter weights after every step, independently of the callback under test."""

    def __init__(self):
        from transformers import TrainerCallback

        snapshots = self.by_step = {}

        class Recorder(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                from peft import get_peft_model_state_dict

                snapshots[state.global_step] = {k: v.detach().clone() for k, v in
                                                get_peft_model_state_dict(model).items()}

        self.callback = Recorder()


def _tiny_trainer(tiny_model_dir, output_dir, max_steps):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from traitmon.chat import AssistantOnlyCollator, encode_training_example
    from traitmon.config import validate_config as vc
    from traitmon.finetune import lora_config
    from traitmon.perturbations import load_domain, written_rows
    from traitmon.settings import study_settings

    model, tok = load_model(tiny_model_dir)
    model.train()
    settings = study_settings(vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"],
                                  "finetune": {"rank": 4, "alpha": 8, "max_length": 128}})).finetune
    model = get_peft_model(model, lora_config(settings))
    rows = written_rows(load_domain("medical"), "em", 2 * max_steps, seed=0)
    data = [encode_training_example(tok, r["messages"], 128) for r in rows]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=AssistantOnlyCollator(tok.pad_token_id))
    return trainer, tok


def test_on_alarm_stop_ends_training_after_patience_consecutive_alarms(bundle_setup, tiny_model_dir, tmp_path):
    import dataclasses

    # steps 1..: alarm, safe (streak reset), alarm, alarm -> stop at step 4 of 8
    bundle = dataclasses.replace(bundle_setup[0], monitor=_ScriptedMonitor([0.9, 0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]))
    trainer, tok = _tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=8)
    callback = TraitMonitorCallback(bundle, tok, every=1, on_save=False, on_alarm="stop", patience=2).attach(trainer)
    with pytest.warns(UserWarning, match="EM alarm at step 4"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert [h["step"] for h in callback.history] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "checkpoint-safe").exists()

    # warn never stops; the deprecated flag still means stop
    bundle = dataclasses.replace(bundle_setup[0], monitor=_ScriptedMonitor([0.9] * 3))
    trainer, tok = _tiny_trainer(tiny_model_dir, tmp_path / "warn", max_steps=3)
    TraitMonitorCallback(bundle, tok, every=1, on_save=False).attach(trainer)
    with pytest.warns(UserWarning, match="EM alarm"):
        trainer.train()
    assert trainer.state.global_step == 3
    bundle = dataclasses.replace(bundle_setup[0], monitor=_ScriptedMonitor([0.9] * 3))
    trainer, tok = _tiny_trainer(tiny_model_dir, tmp_path / "old", max_steps=3)
    with pytest.warns(DeprecationWarning, match="on_alarm='stop'"):
        old = TraitMonitorCallback(bundle, tok, every=1, on_save=False, stop_on_alarm=True)
    old.attach(trainer)
    with pytest.warns(UserWarning, match="EM alarm"):
        trainer.train()
    assert old.on_alarm == "stop" and trainer.state.global_step == 1
    with pytest.raises(TraitmonError, match="on_alarm must be one of"):
        TraitMonitorCallback(bundle, tok, on_alarm="panic")
    with pytest.raises(TraitmonError, match="fitted monitor"):
        TraitMonitorCallback(bundle_setup[0], tok, on_alarm="stop")


def test_on_alarm_rollback_restores_the_last_safe_adapter_bit_for_bit(bundle_setup, tiny_model_dir, tmp_path):
    import dataclasses

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    bundle = dataclasses.replace(bundle_setup[0], monitor=_ScriptedMonitor([0.1, 0.2, 0.9, 0.9, 0.1, 0.1]))
    trainer, tok = _tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=6)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots.callback)
    callback = TraitMonitorCallback(bundle, tok, every=1, on_save=False, on_alarm="rollback",
                                    patience=2).attach(trainer)
    with pytest.warns(UserWarning, match="EM alarm"):
        trainer.train()
    assert trainer.state.global_step == 4
    safe, last = snapshots.by_step[2], snapshots.by_step[4]
    assert any(not torch.equal(safe[k], last[k]) for k in safe)  # training moved past the safe step
    restored = get_peft_model_state_dict(trainer.model)
    assert restored.keys() == safe.keys()
    for key in safe:
        assert torch.equal(restored[key].cpu(), safe[key].cpu()), key
    folder = tmp_path / "run" / "checkpoint-safe"
    assert callback.rollback_path == folder
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved.keys() == safe.keys()
    for key in safe:
        assert torch.equal(saved[key], safe[key].cpu()), key
    record = json.loads((folder / "rollback.json").read_text())
    assert record["safe_step"] == 2 and record["alarm_steps"] == [3, 4] and record["threshold"] == 0.5
    assert record["safe_scores"]["monitor_score"] == pytest.approx(0.2)
    assert [s["monitor_score"] for s in record["alarm_scores"]] == pytest.approx([0.9, 0.9])
    load_model(tiny_model_dir, adapter=str(folder))  # a loadable peft adapter


def test_rollback_before_any_safe_check_restores_the_initial_adapter(bundle_setup, tiny_model_dir, tmp_path):
    import dataclasses

    from peft import get_peft_model_state_dict

    bundle = dataclasses.replace(bundle_setup[0], monitor=_ScriptedMonitor([0.9, 0.9]))
    trainer, tok = _tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=4)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    callback = TraitMonitorCallback(bundle, tok, every=1, on_save=False, on_alarm="rollback").attach(trainer)
    with pytest.warns(UserWarning, match="EM alarm at step 1"):
        trainer.train()
    assert trainer.state.global_step == 1
    for key, value in get_peft_model_state_dict(trainer.model).items():
        assert torch.equal(value.cpu(), initial[key]), key
    assert json.loads((callback.rollback_path / "rollback.json").read_text())["safe_step"] == 0


def _checkpoints_with_known_alarms(bundle, tiny_model_dir, run):
    """checkpoint-1 (a zero adapter: no drift), checkpoint-2 and -3 (random adapters), and a monitor whose
    threshold lies between the zero drift and theirs: checkpoint-1 is safe, 2 and 3 alarm."""
    import dataclasses

    from peft import get_peft_model

    from traitmon.config import validate_config as vc
    from traitmon.finetune import lora_config
    from traitmon.monitor import FittedMonitor
    from traitmon.settings import study_settings

    settings = study_settings(vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"]})).finetune
    drifts = []
    for step, scale in ((1, 0.0), (2, 0.05), (3, 0.06)):
        model, tok = load_model(tiny_model_dir)
        peft_model = get_peft_model(model, lora_config(settings))
        torch.manual_seed(step)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, scale) if scale else p.zero_()
        peft_model.save_pretrained(run / f"checkpoint-{step}")
        drifts.append(np.array(list(bundle.score(peft_model, tok).values())))
    coef = drifts[1] / np.linalg.norm(drifts[1]) + drifts[2] / np.linalg.norm(drifts[2])
    coef = coef / min(coef @ drifts[1], coef @ drifts[2])  # scores >= 1 on both (the 0-1 scale clips them)
    threshold = 0.5
    assert abs(coef @ drifts[0]) < threshold
    monitor = FittedMonitor([f"drift_{t}" for t in bundle.traits], "hand", np.zeros(len(coef)), np.ones(len(coef)),
                            coef, 0.0, "identity", float(threshold), 0.1, 0.05)
    return dataclasses.replace(bundle, monitor=monitor)


def test_watch_on_alarm_writes_a_stop_request_naming_the_safe_checkpoint(bundle_setup, tiny_model_dir, tmp_path,
                                                                         capsys):
    from traitmon.cli import main
    from traitmon.watcher import ALARM_EXIT

    run = tmp_path / "run"
    bundle = _checkpoints_with_known_alarms(bundle_setup[0], tiny_model_dir, run)
    bundle.save(tmp_path / "b")
    common = ["watch", str(run), "--model-dir", str(tiny_model_dir), "--bundle", str(tmp_path / "b"), "--once"]
    assert main(common) == 0  # warn: scores all three, no request
    assert not (run / "traitmon-stop.json").exists()
    assert main([*common, "--on-alarm", "stop", "--patience", "3"]) == 0  # only two alarms in a row
    assert main([*common, "--on-alarm", "stop", "--patience", "2"]) == ALARM_EXIT == 3
    request = json.loads((run / "traitmon-stop.json").read_text())
    assert request["safe_checkpoint"] == str((run / "checkpoint-1").resolve())
    assert request["alarm_checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    assert str(run / "checkpoint-1") in capsys.readouterr().out
    (run / "traitmon-stop.json").unlink()
    assert main([*common, "--on-alarm", "rollback", "--patience", "1"]) == ALARM_EXIT
    request = json.loads((run / "traitmon-stop.json").read_text())
    assert request["alarm_checkpoints"] == ["checkpoint-2"] and request["safe_source"] == "checkpoint-1"
    assert request["safe_checkpoint"] == str((run / "checkpoint-safe").resolve())
    assert (run / "checkpoint-safe" / "adapter_model.safetensors").read_bytes() == \
        (run / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    # checkpoint-safe is not scored as a checkpoint of the run
    assert [r["checkpoint"] for r in watch(run, tiny_model_dir, bundle, once=True)] == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
