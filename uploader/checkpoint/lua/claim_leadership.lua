-- Become, or stay, the one holder of a fleet-wide role (the recovery leader) for ARGV[2] ms.
-- KEYS[1] the role's key. ARGV[1] holder (a worker incarnation), ARGV[2] lease in milliseconds.
-- Returns 1 when ARGV[1] holds the role now (renewed or newly taken), 0 when another holder does.
local current = redis.call("GET", KEYS[1])
if current == ARGV[1] then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
  return 1
end
return 0
