"""The precision resolver: ``auto`` per stage on a CPU with and without native bf16 and on CUDA (the capability
report monkeypatched), the timed probe where the report is unclear, explicit choices kept, and the log line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from traitmon import precision
from traitmon.errors import TraitmonError
from traitmon.precision import Hardware, resolve, resolve_dtype

REAL_PROBE = precision.probe
STAGES = ("finetune", "capture", "directions", "steering", "screening", "bundle", "sampling", "judge")


@pytest.fixture(autouse=True)
def fresh_caches():
    for cached in (precision.cpu_hardware, precision._cuda, precision._announce):
        cached.cache_clear()
    yield
    for cached in (precision.cpu_hardware, precision._cuda, precision._announce):
        cached.cache_clear()


def cpu(monkeypatch, amx: bool, avx512_bf16: bool, capability: str = "AVX512") -> None:
    for var in precision.ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "probe", lambda context: pytest.fail("the report was clear: no probe"))


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_follows_the_cpus_native_bf16_in_every_stage(monkeypatch, amx, avx512_bf16, expected):
    cpu(monkeypatch, amx, avx512_bf16, "AVX512" if avx512_bf16 else "AVX2")
    assert {stage: resolve("auto", "cpu", stage) for stage in STAGES} == dict.fromkeys(STAGES, expected)
    assert resolve_dtype("auto", "cpu", "sampling") == {"bf16": "bfloat16", "fp32": "float32"}[expected]


def test_explicit_choices_are_kept_and_bf16_without_native_support_warns(monkeypatch, caplog):
    cpu(monkeypatch, False, False, "AVX2")
    with caplog.at_level(logging.INFO, logger="traitmon.precision"):
        assert resolve("bf16", "cpu", "capture") == "bf16" and resolve("fp32", "cpu", "finetune") == "fp32"
    assert "precision[capture]: bf16 (set in the config; cpu AVX2, no native bf16)" in caplog.text
    assert "many times slower" in caplog.text
    assert resolve_dtype("float16", "cpu", "judge") == "float16"  # an explicit dtype is the user's
    with pytest.raises(TraitmonError, match="precision 'fp16'"):
        resolve("fp16", "cpu", "capture")


def test_each_stage_logs_its_choice_and_reason_once(monkeypatch, caplog):
    cpu(monkeypatch, False, False, "AVX2")
    with caplog.at_level(logging.INFO, logger="traitmon.precision"):
        for _ in range(3):
            resolve("auto", "cpu", "capture")
    assert caplog.messages == ["precision[capture]: fp32 (cpu AVX2, no native bf16)"]


def test_cuda_resolves_by_the_devices_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve("auto", "cuda:0", "finetune") == "bf16"
    assert resolve_dtype("auto", "cuda:0", "sampling") == "bfloat16"
    precision._cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100
    assert resolve("auto", "cuda:0", "finetune") == "fp32"
    assert "no native bf16" in precision.hardware("cuda:0").reason


@pytest.mark.parametrize("bf16_seconds, native", [(0.5, True), (50.0, False)])
def test_a_capped_instruction_set_is_decided_by_the_timed_probe(monkeypatch, bf16_seconds, native):
    """The CPU reports AMX but ONEDNN_MAX_CPU_ISA caps it (as on a machine set up to behave like AVX2): the
    report cannot be trusted, so a matmul is timed in each precision."""
    cpu(monkeypatch, True, True)
    monkeypatch.setattr(precision, "probe", REAL_PROBE)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    times = iter([1.0, bf16_seconds])  # float32 first, then bf16
    monkeypatch.setattr(precision, "_best_seconds", lambda run, repeats=3: next(times))
    found = precision.cpu_hardware()
    assert found.native_bf16 is native and "ONEDNN_MAX_CPU_ISA=AVX2" in found.reason and "timed probe" in found.reason
    assert resolve("auto", "cpu", "capture") == ("bf16" if native else "fp32")


def test_the_probe_really_times_both_precisions():
    found = precision.probe("test", size=32)
    assert isinstance(found, Hardware) and "bf16 matmul" in found.reason


def test_stores_record_the_resolved_precision_never_auto(monkeypatch, tiny_model):
    from traitmon.capture import capture_dataset

    model, tok = tiny_model
    chats = [[{"role": "user", "content": "Hello?"}], [{"role": "user", "content": "How are you?"}]]
    for native, expected in ((False, "fp32"), (True, "bf16")):
        precision.cpu_hardware.cache_clear()
        cpu(monkeypatch, native, native)
        ds = capture_dataset(model, tok, ["a", "b"], chats, "Fine.", [1], 2, "float32", {}, "auto")
        assert ds.attrs["precision"] == expected


def test_finetune_trains_under_autocast_only_where_auto_resolves_bf16(monkeypatch):
    from test_finetune import tiny_settings
    from traitmon.finetune import training_arguments

    for native in (False, True):
        precision.cpu_hardware.cache_clear()
        cpu(monkeypatch, native, native)
        args = training_arguments(tiny_settings(precision="auto"), "/tmp/unused", torch.device("cpu"))
        assert args.bf16 is native


def test_sampling_dtype_auto_is_resolved_before_it_keys_the_answer_caches(monkeypatch):
    from traitmon.cli import _sampling_settings
    from traitmon.settings import section_defaults

    blob = json.dumps({**section_defaults("behavior"), "model_dtype": "auto"})
    assert json.loads(blob)["generation"]["dtype"] == "auto"  # the schema's default
    for native, dtype in ((False, "float32"), (True, "bfloat16")):
        precision.cpu_hardware.cache_clear()
        cpu(monkeypatch, native, native)
        assert _sampling_settings(blob)[0].generation.dtype == dtype


def test_a_resume_at_another_precision_is_refused_naming_the_state_and_the_key(tmp_path):
    from traitmon.finetune import check_resume_precision

    check_resume_precision(tmp_path, {"step": 2}, "fp32")  # states saved before the key: resumed as they are
    check_resume_precision(tmp_path, {"step": 2, "precision": "fp32"}, "fp32")
    with pytest.raises(TraitmonError, match="began at bf16 and would resume at fp32 .*finetune.precision: bf16"):
        check_resume_precision(tmp_path / "state-2", {"step": 2, "precision": "bf16"}, "fp32")
