"""bgsync benchmarks: ratios against a reference measured in the same run on the same server."""
