-- Forget an upload that never got past "creating" (its request was refused by the store).
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases, KEYS[4] index, KEYS[5] attention index,
-- KEYS[6] settled uploads. ARGV[1] upload id, ARGV[2] now.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "creating" then
  return state or "missing"
end
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
redis.call("ZREM", KEYS[4], ARGV[1])
track_attention(KEYS[1], KEYS[5], KEYS[6], ARGV[2])
return "ok"
