"""Small shared helpers: atomic writes (:mod:`.atomic`), logging (:mod:`.logs`), content hashes
(:mod:`.hashing`) and JSON files (:mod:`.jsonio`). One implementation of each, used everywhere."""
