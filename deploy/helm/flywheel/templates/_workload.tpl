{{/*
The pieces of a long-running Flywheel service, one define each, called from templates/<service>/.
Every one takes (dict "root" $ "component" "<service>") plus, for the Deployment, optional
"env", "volumes", "volumeMounts" (YAML lists as strings), "liveness" (a probe as a string),
"serviceAccountName", "strategy", "gpu" and "noArtifacts" (the service does not use the artifact store).
*/}}

{{- define "flywheel.deployment" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $gpu := .gpu | default (dict "enabled" false) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  {{- if not (and $values.autoscaling $values.autoscaling.enabled) }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- if eq (.strategy | default "RollingUpdate") "Recreate" }}
  strategy:
    type: Recreate
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "flywheel.labels" . | nindent 8 }}
      annotations:
        kubectl.kubernetes.io/default-container: {{ .component }}
        {{- if not $root.Values.secrets.existingSecret }}
        checksum/secrets: {{ include (print $root.Template.BasePath "/shared/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- if .serviceAccountName }}
      serviceAccountName: {{ .serviceAccountName }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with include "flywheel.imagePullSecrets" $root | trim }}{{ . | nindent 6 }}{{ end }}
      {{- with include "flywheel.scheduling" (dict "root" $root "values" $values "gpu" $gpu) | trim }}{{ . | nindent 6 }}{{ end }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "flywheel.selectorLabels" . | nindent 14 }}
      containers:
        - name: {{ .component }}
          image: {{ include "flywheel.image" (dict "root" $root "image" $values.image) }}
          imagePullPolicy: {{ include "flywheel.imagePullPolicy" (dict "root" $root "image" $values.image) }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $values.ports.grpc }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $values.ports.metrics }}
              protocol: TCP
          env:
            {{- include "flywheel.commonEnv" . | trim | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with include "flywheel.settingsEnv" (dict "prefix" (include "flywheel.envPrefix" .) "settings" $values.settings) | trim }}{{ . | nindent 12 }}{{ end }}
            {{- with $values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- include "flywheel.resources" (dict "root" $root "resources" $values.resources "gpu" $gpu) | nindent 12 }}
          {{- if $values.probes.startup.enabled }}
          startupProbe:
            {{- include "flywheel.grpcProbe" (dict "probe" $values.probes.startup "port" $values.ports.grpc) | nindent 12 }}
          {{- end }}
          {{- if $values.probes.readiness.enabled }}
          readinessProbe:
            {{- include "flywheel.grpcProbe" (dict "probe" $values.probes.readiness "port" $values.ports.grpc) | nindent 12 }}
          {{- end }}
          {{- if $values.probes.liveness.enabled }}
          livenessProbe:
            {{- if .liveness }}
            {{- .liveness | nindent 12 }}
            {{- else }}
            {{- include "flywheel.grpcProbe" (dict "probe" $values.probes.liveness "port" $values.ports.grpc) | nindent 12 }}
            {{- end }}
          {{- end }}
          volumeMounts:
            {{- if not .noArtifacts }}
            - name: artifacts
              mountPath: {{ $root.Values.artifacts.mountPath }}
            {{- end }}
            - name: tmp
              mountPath: /tmp
            {{- with include "flywheel.kafkaVolumeMounts" . | trim }}{{ . | nindent 12 }}{{ end }}
            {{- with .volumeMounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        {{- if not .noArtifacts }}
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "flywheel.artifactsClaim" $root }}
        {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
        {{- with include "flywheel.kafkaVolumes" . | trim }}{{ . | nindent 8 }}{{ end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end }}

{{- define "flywheel.service" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
  {{- with $values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $values.service.type }}
  selector:
    {{- include "flywheel.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $values.ports.grpc }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $values.ports.metrics }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{- define "flywheel.pdb" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- if $values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{- define "flywheel.hpa" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $scaling := $values.autoscaling }}
{{- if $scaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "flywheel.componentName" . }}
  minReplicas: {{ $scaling.minReplicas }}
  maxReplicas: {{ $scaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $scaling.targetCPUUtilizationPercentage }}
    {{- if $scaling.targetQueueDepth }}
    - type: Pods
      pods:
        metric:
          name: flywheel_inference_queue_depth
        target:
          type: AverageValue
          averageValue: {{ $scaling.targetQueueDepth | quote }}
    {{- end }}
  behavior:
    scaleDown:
      # Replicas hold a loaded model: shrink slowly.
      stabilizationWindowSeconds: 600
      policies:
        - type: Pods
          value: 1
          periodSeconds: 300
{{- end }}
{{- end }}

{{- define "flywheel.serviceMonitor" -}}
{{- $root := .root }}
{{- $sm := $root.Values.metrics.serviceMonitor }}
{{- if $sm.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
    {{- with $sm.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  jobLabel: app.kubernetes.io/component
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ $root.Release.Namespace }}
  endpoints:
    - port: metrics
      path: /metrics
      scheme: http
      interval: {{ $sm.interval }}
      scrapeTimeout: {{ $sm.scrapeTimeout }}
      # The metrics carry a `service` label (the gRPC service); keep it rather than
      # have it renamed exported_service by the target's own `service` label.
      honorLabels: true
{{- end }}
{{- end }}

{{/*
A NetworkPolicy: default deny for the component's pods, then ingress on gRPC from "grpcFrom"
(a list of peers; the release's own pods are always allowed), metrics from the scrapers, and
egress to DNS, Kafka, an OTLP collector and "egress" (extra rules as a YAML string).
*/}}
{{- define "flywheel.networkPolicy" -}}
{{- $root := .root }}
{{- $np := $root.Values.networkPolicy }}
{{- $values := index $root.Values .component }}
{{- if $np.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "flywheel.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- include "flywheel.releaseSelectorLabels" $root | nindent 14 }}
        {{- with .grpcFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - port: grpc
          protocol: TCP
    - from:
        {{- toYaml $np.scrapers | nindent 8 }}
      ports:
        - port: metrics
          protocol: TCP
  egress:
    - to:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: kube-system
          podSelector:
            matchLabels:
              k8s-app: kube-dns
      ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
    - {{- with $np.kafkaPeers }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- range $np.kafkaPorts }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- if $root.Values.tracing.otlpEndpoint }}
    - {{- with $np.otlpPeers }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - port: 4317
          protocol: TCP
    {{- end }}
    {{- with .egress }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
