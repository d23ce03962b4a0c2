"""``python -m mae_core.params``: the earlier name of ``python -m mae_core.audit``, kept for scripts."""

from mae_core.audit import main

if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main(prog="python -m mae_core.params"))
