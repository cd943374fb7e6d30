"""Running the parties as real processes: certificates, keys, and the local deployment."""
