"""`python -m vlmtune ...` is the `vlmtune` command: what launchers run (`torchrun -m vlmtune`,
`accelerate launch -m vlmtune`, DeepSpeed's and Slurm scripts), and what works where the console script
is not on the PATH."""

from .cli import main

if __name__ == "__main__":
    main()
