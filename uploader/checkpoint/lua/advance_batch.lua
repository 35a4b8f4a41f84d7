-- A directory batch's listing moves past one page: page ARGV[1] -> ARGV[1] + 1, once.
-- KEYS[1] batch hash.
-- ARGV[1] the page the caller listed, ARGV[2] the cursor after it (JSON), ARGV[3] "1" when the
-- listing is done, ARGV[4] files skipped in the page (unchanged), ARGV[5] their bytes,
-- ARGV[6] now, ARGV[7] retention seconds (the batch's keys expire that long after its listing ends),
-- KEYS[2..] the batch's other keys (given the same expiry).
-- Returns "ok", "stale" (another delivery of the page advanced it already), "cancelled" or "missing".
local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return "missing"
end
if state == "cancelled" then
  return "cancelled"
end
if redis.call("HGET", KEYS[1], "page") ~= ARGV[1] or state ~= "listing" then
  return "stale"
end
redis.call("HSET", KEYS[1], "page", tonumber(ARGV[1]) + 1, "cursor", ARGV[2], "updated", ARGV[6])
redis.call("HINCRBY", KEYS[1], "files_skipped", ARGV[4])
redis.call("HINCRBY", KEYS[1], "bytes_skipped", ARGV[5])
if ARGV[3] == "1" then
  redis.call("HSET", KEYS[1], "state", "listed", "listed_at", ARGV[6])
  for i = 1, #KEYS do
    redis.call("EXPIRE", KEYS[i], ARGV[7])
  end
end
return "ok"
