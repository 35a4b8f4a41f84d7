-- Choose the part lane of a dispatch and hold it for a moment. A lane is free when nothing is
-- queued in it and no other dispatch took it in the last moments (a dispatch's first messages
-- may not be queued yet: the hold keeps uploads dispatched together apart). The first free
-- lane; with none free, the lane with the fewest queued messages, and of those the one held
-- longest ago (or not held at all), so that a burst of dispatches still spreads over the lanes
-- and none joins a long backlog while a lane with a short one exists.
-- KEYS[1] the holds (a hash: lane -> held until). ARGV[1] now, ARGV[2] seconds to hold,
-- ARGV[3..] the messages queued in each lane, in lane order.
local now = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local best, best_key = nil, nil
for i = 3, #ARGV do
  local lane = i - 3
  local queued = tonumber(ARGV[i])
  local held_until = tonumber(redis.call("HGET", KEYS[1], lane) or "0")
  if held_until <= now then held_until = 0 end
  local busy = (queued > 0 or held_until > 0) and 1 or 0
  local better = best == nil
  if not better then
    local b = best_key
    better = busy < b[1] or (busy == b[1] and (queued < b[2] or (queued == b[2] and held_until < b[3])))
  end
  if better then best, best_key = lane, {busy, queued, held_until} end
end
redis.call("HSET", KEYS[1], best, now + hold)
-- The holds go with the last of them (never sooner: a short hold must not cut a longer one).
if redis.call("TTL", KEYS[1]) < math.ceil(hold) + 1 then
  redis.call("EXPIRE", KEYS[1], math.ceil(hold) + 1)
end
return best
