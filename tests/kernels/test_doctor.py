"""`megaswift doctor` reports versions and, for every op and device, the path that really runs."""
import argparse
import json

from megaswift.cli import doctor
from megaswift.kernels import _dispatch


def test_doctor_reports_kernel_paths(capsys):
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    assert doctor.run(parser.parse_args(["--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("torch", "megatron_core", "transformers", "cuda_available", "transformer_engine_importable",
                "apex_importable"):
        assert key in report
    for op, devices in _dispatch.DEVICES_FOR_OP.items():
        for device in devices:
            path = report["kernels"][op][device]
            compiled = _dispatch.why_not_compiled(op, device) is None
            assert path.startswith("csrc") == compiled, path
            assert compiled or "torch reference:" in path


def test_doctor_names_the_reason_when_forced_to_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(_dispatch, "why_not_compiled", lambda op, device: "pretend it is not built")
    assert doctor.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert out.count("torch reference: pretend it is not built") == 3
