"""SUPERB downstream evaluation (floor 7): frozen upstream, learned layer weights, cached features, task heads
and their metrics."""
