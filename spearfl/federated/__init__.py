"""What the server does with what travels: aggregation strategies, the upload codec, the client learning-rate schedule."""
