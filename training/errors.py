"""User errors: one `error:` line on stderr (rank 0 only), an exit status, no traceback unless GANFORGE_DEBUG=1."""
import os
import sys
import traceback

# Exit statuses: 2 for bad input (a path, a key, a value, a file's content), 1 for a failure at run time.
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1


class UserError(Exception):
    """A mistake of the user's or a failure they can act on. The message says what, where (file, key or value) and
    what to do; `exit_code` is EXIT_BAD_INPUT by default."""
    exit_code = EXIT_BAD_INPUT


class RunTimeFailure(UserError):
    """A failure at run time that the user can act on (disk full, a refused resume, a live run in the way)."""
    exit_code = EXIT_RUNTIME


class ResumeError(RunTimeFailure, ValueError):
    """The run cannot start from what it was asked to resume from (and the message says why)."""


def debug() -> bool:
    """Whether GANFORGE_DEBUG asks for tracebacks."""
    return os.environ.get("GANFORGE_DEBUG", "").strip() not in ("", "0", "false", "no")


def report(e: BaseException, exit_code: int | None = None) -> int:
    """Print `error: <message>` once (rank 0 of a launched job; every process otherwise) and return the exit status.
    With GANFORGE_DEBUG=1 the traceback comes first."""
    code = exit_code if exit_code is not None else getattr(e, "exit_code", EXIT_RUNTIME)
    if os.environ.get("RANK", "0") == "0":
        if debug():
            traceback.print_exception(e)
        # An OSError made as (errno, message) reads "[Errno N] message": the message says it all.
        text = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else str(e)
        message = " ".join(text.split("\n")).strip() or type(e).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run_cli(main, end=sys.exit) -> None:
    """A script's entry point: run `main()` and end the process through `end` (sys.exit, or dist.end_process in a
    launched job) with its status. A UserError, or a SystemExit carrying a message (the scripts' checks of their
    options), becomes one `error:` line (report) and its exit status (2 for a message)."""
    try:
        status = main()
    except UserError as e:
        status = report(e)
    except SystemExit as e:
        status = e.code
        if isinstance(status, str):
            text = status[len("error:"):].strip() if status.startswith("error:") else status
            status = report(UserError(text))
    end(status)
