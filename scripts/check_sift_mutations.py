#!/usr/bin/env python
"""Mutation check of SiFT: apply each wrong line to a copy of modeling_deberta_custom/sift.py, run tests/test_sift.py
against the copy (without the slow Trainer tests), and print which tests fail. Every mutation must fail some test.

    OMP_NUM_THREADS=1 python scripts/check_sift_mutations.py
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTATIONS = {
    "skip the ascent": ("perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()",
                        "perturbation.delta = delta.detach().requires_grad_()"),
    "reverse the ascent": ("perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()",
                           "perturbation.delta = ascent_step(delta, -delta.grad, step_size).requires_grad_()"),
    "perturb raw embeddings": ("return ((normalized.detach().to(self.delta.dtype) + self.delta).to(x.dtype),)",
                               "return ((x.detach().to(self.delta.dtype) + self.delta).to(x.dtype),)"),
    "detach the final term's clean side": ("return sum(symmetric_kl(p, c).mean() for p, c",
                                           "return sum(symmetric_kl(p, c.detach()).mean() for p, c"),
    "no move ahead of integrations": ("        self._move_ahead_of_integrations()\n", ""),
}
for name, (old, new) in MUTATIONS.items():
    work = Path(tempfile.mkdtemp(prefix="sift-mutant-"))
    shutil.copytree(REPO / "modeling_deberta_custom", work / "modeling_deberta_custom")
    shutil.copytree(REPO / "tests", work / "tests")
    source = work / "modeling_deberta_custom" / "sift.py"
    text = source.read_text()
    assert text.count(old) == 1, name
    source.write_text(text.replace(old, new))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sift.py",
                             "-k", "not ddp and not training_options and not learns"],
                            cwd=work, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(work)))
    failed = [line.split(" ")[1].split("::")[1] for line in result.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{name}: {len(failed)} failing: {failed}", flush=True)
    shutil.rmtree(work)
