-- set_virtual_queues: replace the virtual queues of several workers at once.
--
-- KEYS[1 .. w]     vq:{worker} for each worker, in the order of ARGV
-- KEYS[w+1]        workers     set of known workers
-- KEYS[w+2]        scheduler:fence  the fencing token of the current leader's term
-- ARGV[1]          w           number of workers
-- ARGV[2 .. w+1]               worker ids
-- ARGV[w+2]        orders      JSON array: each worker's new order, an array of group
--                              keys head first, in the order of the worker ids (one
--                              argument: the client encodes one text, not one per group)
-- ARGV[w+3]        fence       the writer's fencing token ("0": no check)
--
-- Returns the number of workers updated. An empty order deletes the list; the
-- worker stays known. Returns -1 and writes nothing when ``fence`` is not the current
-- fencing token: a scheduler that lost its lease (a newer term began) cannot overwrite
-- the orders of the new leader, however late its write arrives.

local w = tonumber(ARGV[1])
local fence = ARGV[w + 3]
if fence ~= '0' and redis.call('GET', KEYS[w + 2]) ~= fence then
  return -1
end
local orders = cjson.decode(ARGV[w + 2])
for i = 1, w do
  local vq = KEYS[i]
  local order = orders[i]
  redis.call('DEL', vq)
  for j = 1, #order, 500 do
    redis.call('RPUSH', vq, unpack(order, j, math.min(j + 499, #order)))
  end
  redis.call('SADD', KEYS[w + 1], ARGV[1 + i])
end
return w
