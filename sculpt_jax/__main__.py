"""`python -m sculpt_jax ...`: see `sculpt_jax.cli`."""

from sculpt_jax.cli import run

if __name__ == "__main__":
    run()
