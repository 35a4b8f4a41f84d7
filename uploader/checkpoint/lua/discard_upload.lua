-- Forget an upload that never got past "creating" (its request was refused by the store).
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] index. ARGV[1] upload id.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "creating" then
  return state or "missing"
end
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
redis.call("ZREM", KEYS[4], ARGV[1])
return "ok"
