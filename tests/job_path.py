"""How far one job's path wanders: the package's modules a trial's job enters, and the calls that go back
into a module still waiting on the stack (A -> B -> A), traced while the job runs. Not a test: a measure
for the people who keep the code readable (issue 20: "one trial reads top to bottom").

    .venv/bin/python tests/job_path.py [overrides ...]

runs one tiny trial (`-m workers=serial`, so the job runs in this process) in a scratch folder, traces
the calls under `resnet_sweep.job.run` in the main thread, and prints the modules in the order first
entered, then each (caller, callee) pair of modules where a call went back into a module on the stack,
with how often (the caller is the nearest frame of the package; a generator's resumption counts as a call). A callback handed
down on purpose (the epoch's recording and reporting, which `fit` calls) shows up there too.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from collections import Counter

PACKAGE = "resnet_sweep"
ENTRY = ("resnet_sweep.job", "run")


def main(overrides: list[str]) -> None:
    entered: list[str] = []  # modules in the order first entered
    back: Counter = Counter()  # (caller, callee) calls into a module already on the stack below the caller
    stack: list[tuple[int, str]] = []  # (frame id, module) of the package's frames under ENTRY

    def profile(frame, event, arg) -> None:  # noqa: ANN001, ARG001
        module = frame.f_globals.get("__name__", "")
        if event == "call" and (stack or (module, frame.f_code.co_name) == ENTRY) and module.startswith(PACKAGE + "."):
            if module not in entered:
                entered.append(module)
            if stack and module != stack[-1][1] and module in {m for _, m in stack[:-1]}:
                back[(stack[-1][1], module)] += 1
            stack.append((id(frame), module))
        elif event == "return" and stack and stack[-1][0] == id(frame):
            stack.pop()

    folder = tempfile.mkdtemp(prefix="job-path-")
    os.chdir(folder)
    sys.argv = [PACKAGE, "-m", "workers=serial", "hydra.sweeper.n_trials=1", "trainer.epochs=2",
                "data.train_subset=128", *overrides]
    sys.setprofile(profile)
    try:
        runpy.run_module(PACKAGE, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        sys.setprofile(None)
    short = [m.removeprefix(f"{PACKAGE}.") for m in entered]
    print(f"\n{len(entered)} modules entered by one job, in order: {' -> '.join(short)}")
    print(f"calls back into a module on the stack: {sum(back.values())}, between {len(back)} pair(s) of modules:")
    for (caller, callee), times in back.most_common():
        print(f"  {caller.removeprefix(PACKAGE + '.')} -> {callee.removeprefix(PACKAGE + '.')}  x{times}")
    print(f"(scratch folder: {folder})")


if __name__ == "__main__":
    main(sys.argv[1:])
