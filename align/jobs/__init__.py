"""prefloop.align.jobs: align jobs end to end — data, train, evaluate, gate, publish, promote; and the schedule."""
