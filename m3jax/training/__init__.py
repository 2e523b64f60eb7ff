"""Training M3-architecture models: losses (LM + MSA indexer KL), the optax train step with Orbax train state,
and the tokenizer/data pipeline. `m3jax train` is `m3jax.training.cli.train_main`."""
