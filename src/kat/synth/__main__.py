"""``python -m kat.synth`` (see kat.synth.run)."""
from kat.synth.run import main

if __name__ == "__main__":
    main()
