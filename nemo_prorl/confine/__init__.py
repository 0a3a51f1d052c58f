"""Running hostile code and hostile answers confined: the one subsystem the code reward, the verifiers,
`prorl doctor`, the config checks and the trainer use to touch what a model wrote. Below `rewards/` (which
holds the verifiers and their contract) and above `config/` and `procs`; it imports nothing of the trainer.

- jail.py: the primitives (allowlist root, namespaces, unprivileged uid, seccomp), standard library only;
- runner.py / driver.py: the process that runs a program inside the jail, and the harness for function
  tests that runs inside it with the program (both standard library only, started as scripts);
- sandbox.py: the `Sandbox` interface (`run(code, inputs) -> SandboxRun`), the local sandbox and the
  sandbox uid block; remote.py / server.py: the remote sandbox's client and its HTTP server (imported
  when a remote sandbox is built, not here: remote.py is also the server's command); backends.py: the
  backends by name (`reward.sandbox.backend`);
- workers.py / guard.py: pools of confined verifier processes with a hard per-call time limit, and the
  state guard that ends a worker whose verifier an answer patched.
"""

from nemo_prorl.confine.backends import SANDBOXES, make_sandbox
from nemo_prorl.confine.guard import GUARDED_OBJECTS
from nemo_prorl.confine.sandbox import (LocalSandbox, Sandbox, SandboxRun, TestRun, UnconfinedError, check_sandbox_uids,
                                        sandbox_confines)
from nemo_prorl.confine.workers import HardTimeoutPool, Outcome

__all__ = ["GUARDED_OBJECTS", "HardTimeoutPool", "LocalSandbox", "Outcome", "SANDBOXES", "Sandbox", "SandboxRun",
           "TestRun", "UnconfinedError", "check_sandbox_uids", "make_sandbox", "sandbox_confines"]
