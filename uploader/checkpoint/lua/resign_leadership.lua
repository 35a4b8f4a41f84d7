-- Give up a fleet-wide role (a clean shutdown), so that another holder takes it at its next try.
-- KEYS[1] the role's key. ARGV[1] holder. Returns 1 if it held the role, else 0.
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
