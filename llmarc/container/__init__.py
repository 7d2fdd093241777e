"""The .llma container format (spec/format.md): layout, streaming writer, hostile-safe reader."""
