"""What several stages share: params schema, artifact IO, memory meter, text helpers."""
