"""dynvit's command line: ``python cli.py fit --config experiments/digits_prune.yaml`` (see README)."""

from dynvit.run.cli import main

if __name__ == "__main__":
    main()
