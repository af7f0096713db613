"""python -m cgspn_jax.distill: the cgspn-distill command."""
from cgspn_jax.distill.run import main

if __name__ == "__main__":
    main()
