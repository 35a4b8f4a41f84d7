-- A directory batch -> "cancelled": its listing stops at the next page (its uploads are cancelled
-- one by one by the caller). KEYS[1] batch hash, KEYS[2..] its other keys.
-- ARGV[1] now, ARGV[2] retention seconds (the keys expire that long after).
-- Returns "cancelled" (changed now), "already", or "missing".
local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return "missing"
end
if state == "cancelled" then
  return "already"
end
redis.call("HSET", KEYS[1], "state", "cancelled", "updated", ARGV[1], "finished", ARGV[1])
for i = 1, #KEYS do
  redis.call("EXPIRE", KEYS[i], ARGV[2])
end
return "cancelled"
