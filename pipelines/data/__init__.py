"""Real game video: games, behaviour policies, HDF5 shards, Parquet manifest, clip readers."""
